"""Packing: examples never split, offsets and lengths right, padding masked and made of an existing id."""

import random

import pytest
import sentencepiece as spm

from cllama_dist.sft.encode import Encoded, encode_conversation
from cllama_dist.sft.pack import default_pad_id, pack_examples, pad_example
from cllama_dist.sft.records import single_turn
from cllama_dist.sft.templates import builtin


def examples(n, seed=0, max_len=40):
    rng = random.Random(seed)
    out = []
    for k in range(n):
        length = rng.randint(1, max_len)
        ids = [1] + [rng.randint(3, 999) for _ in range(length - 1)]
        cut = rng.randint(1, length)
        out.append(Encoded(ids, [0] * cut + [1] * (length - cut)))
    return out


@pytest.mark.parametrize("block_size", [40, 64, 257])
def test_packing_never_splits_and_keeps_order(block_size):
    exs = examples(300)
    blocks = list(pack_examples(exs, block_size, pad_id=0))
    seen = []
    for b in blocks:
        assert len(b.input_ids) == len(b.loss_mask) == block_size
        assert b.example_starts[0] == 0 and b.example_starts == sorted(b.example_starts)
        assert b.n_tokens == sum(b.example_lengths())
        for start, length in zip(b.example_starts, b.example_lengths()):
            seen.append((b.input_ids[start:start + length], b.loss_mask[start:start + length]))
        # Padding: the pad id, no loss, no attention.
        assert b.input_ids[b.n_tokens:] == [0] * (block_size - b.n_tokens)
        assert b.loss_mask[b.n_tokens:] == [0] * (block_size - b.n_tokens)
        assert b.attention_mask() == [1] * b.n_tokens + [0] * (block_size - b.n_tokens)
    assert seen == [(e.input_ids, e.loss_mask) for e in exs]  # every example whole, in order
    # Greedy: a block is closed only when the next example would not fit in it.
    for b, nxt in zip(blocks, blocks[1:]):
        first_next = nxt.example_lengths()[0]
        assert b.n_tokens + first_next > block_size


def test_position_ids_restart_per_example():
    exs = [Encoded([1, 5, 6], [0, 1, 1]), Encoded([1, 7], [0, 1]), Encoded([1, 8, 9, 10], [0, 0, 1, 1])]
    (b,) = list(pack_examples(exs, 12, pad_id=0))
    assert b.example_starts == [0, 3, 5] and b.n_tokens == 9
    assert b.position_ids() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1, 2]
    assert b.input_ids == [1, 5, 6, 1, 7, 1, 8, 9, 10, 0, 0, 0]
    assert b.loss_mask == [0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0]


def test_errors_and_edge_cases():
    with pytest.raises(ValueError, match="more than block_size"):
        list(pack_examples([Encoded([1] * 9, [1] * 9)], 8, 0))
    with pytest.raises(ValueError, match="differ in length"):
        list(pack_examples([([1, 2], [1])], 8, 0))
    assert list(pack_examples([], 8, 0)) == []
    (b,) = list(pack_examples([([1] * 8, [1] * 8)], 8, 0))  # exactly full: no padding
    assert b.n_tokens == 8 and b.attention_mask() == [1] * 8


def test_pad_example_is_the_papers_layout(tiny_merged):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    pad = default_pad_id(sp)
    # No pad piece in a LLaMA-style model: UNK, which byte fallback never emits, and an existing row.
    assert sp.pad_id() < 0 and pad == sp.unk_id() == 0 and pad < sp.get_piece_size()
    ex = encode_conversation(single_turn("你好", "你好！"), builtin("llama2"), sp, 64)
    assert pad not in ex.input_ids
    b = pad_example(ex, 64, pad)
    n = len(ex.input_ids)
    assert b.input_ids == ex.input_ids + [pad] * (64 - n)
    assert b.loss_mask == ex.loss_mask + [0] * (64 - n)
    assert b.attention_mask() == [1] * n + [0] * (64 - n) and b.example_starts == [0]
    with pytest.raises(ValueError):
        pad_example(ex, n - 1, pad)
