"""Blocks of encoded examples: packed several to a block, or one to a block padded (the paper's layout).

Packing never splits an example: an example goes whole into the current block or starts the next one.
Each block records where its examples start (``example_starts``) and how many of its tokens are real
(``n_tokens``), so the trainer can build document-aware attention and reset position ids per example;
nothing about attention or padding is inferred from token ids.

That matters for the pad id. The paper (v1 run_clm_sft_with_peft.py) adds a "[PAD]" token, a new
vocabulary row (49,954), and its collator derives the attention mask as ``input_ids != pad_id``. Here
padding uses an id that already exists and is masked out of loss and attention by position:
``default_pad_id`` is the model's pad piece when it has one, else UNK. UNK rather than EOS because with
byte fallback (LLaMA's) the encoder never emits UNK, so even code that does compare ids with the pad
id cannot confuse padding with a real token; a real EOS carries loss (the model must learn to stop).

The loss needs no special care at example boundaries: every example begins with BOS, whose loss mask
is 0, so the shifted labels never ask a token of one example to predict the first token of the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence


@dataclass
class Block:
    input_ids: list[int]
    loss_mask: list[int]
    example_starts: list[int]  # offset of each example in the block; the first is 0
    n_tokens: int  # real tokens; positions [n_tokens, len(input_ids)) are padding

    def attention_mask(self) -> list[int]:
        return [1] * self.n_tokens + [0] * (len(self.input_ids) - self.n_tokens)

    def position_ids(self) -> list[int]:
        """Positions restarting at 0 at every example (and for the padding tail)."""
        bounds = list(self.example_starts) + [self.n_tokens]
        pos: list[int] = []
        for a, b in zip(bounds, bounds[1:]):
            pos.extend(range(b - a))
        pos.extend(range(len(self.input_ids) - self.n_tokens))
        return pos

    def example_lengths(self) -> list[int]:
        bounds = list(self.example_starts) + [self.n_tokens]
        return [b - a for a, b in zip(bounds, bounds[1:])]


def default_pad_id(sp) -> int:
    """The model's pad id if it has one, else UNK (never emitted with byte fallback): no new row."""
    return sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id()


def _parts(example) -> tuple[Sequence[int], Sequence[int]]:
    ids, mask = example[0], example[1]  # an Encoded, or any (input_ids, loss_mask) pair
    if len(ids) != len(mask):
        raise ValueError(f"input_ids ({len(ids)}) and loss_mask ({len(mask)}) differ in length")
    if not ids:
        raise ValueError("an empty example cannot be packed")
    return ids, mask


def _close(ids: list[int], mask: list[int], starts: list[int], block_size: int, pad_id: int) -> Block:
    n = len(ids)
    pad = block_size - n
    return Block(ids + [pad_id] * pad, [int(bool(m)) for m in mask] + [0] * pad, starts, n)


def pack_examples(examples: Iterable, block_size: int, pad_id: int) -> Iterator[Block]:
    """Greedy, order-preserving packing: append examples while they fit, then pad and start a new block.

    Examples longer than ``block_size`` are an error (the encoder's max_len must not exceed it).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, not {block_size}")
    ids: list[int] = []
    mask: list[int] = []
    starts: list[int] = []
    for k, ex in enumerate(examples):
        e_ids, e_mask = _parts(ex)
        if len(e_ids) > block_size:
            raise ValueError(f"example {k} has {len(e_ids)} tokens, more than block_size {block_size}")
        if len(ids) + len(e_ids) > block_size:
            yield _close(ids, mask, starts, block_size, pad_id)
            ids, mask, starts = [], [], []
        starts.append(len(ids))
        ids.extend(e_ids)
        mask.extend(e_mask)
    if ids:
        yield _close(ids, mask, starts, block_size, pad_id)


def pad_example(example, length: int, pad_id: int) -> Block:
    """One example right-padded to ``length``: the paper's one-example-per-row layout."""
    ids, mask = _parts(example)
    if len(ids) > length:
        raise ValueError(f"example has {len(ids)} tokens, more than length {length}")
    return _close(list(ids), list(mask), [0], length, pad_id)
