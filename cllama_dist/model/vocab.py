"""Extend embed_tokens and lm_head from V to V' rows, keeping the V original rows frozen.

Freezing old rows with a gradient mask is fragile: gradients are sharded under ZeRO-3, and AdamW's
weight decay moves masked rows anyway (docs/hazards.md#h3). So the split is structural: each matrix
becomes a frozen parameter holding rows [0, V) and a trainable parameter holding only rows [V, V'). The
optimizer then holds state for the new rows alone (for 7B: 2 x 17,953 x 4,096 = 147M parameters
instead of 2 x 49,953 x 4,096 = 409M), and the old rows cannot move: nothing can update them.

Vocabulary sizes always come from config and tokenizer metadata, never from a weight's shape: under
ZeRO-3 a partitioned weight has shape 0 (H1).

Tied models (lm_head = embed_tokens: Llama 3.2, Qwen2.5, SmolLM2) keep one matrix: the head module holds the
embedding's two Parameters themselves, so one block of new rows serves both and the optimizer sees it once.
PEFT's ``modules_to_save`` or two copies would let the input and output rows drift apart, and a merge would
keep only one of them (DESIGN B6). Under ZeRO-3 a Parameter shared by two modules is gathered by
each module's hooks in turn; it stays one Parameter, so no resume or load can untie it.

Rows are not tokens (DESIGN B7): a base may hold more rows than its tokenizer has tokens (Qwen2.5:
151,665 tokens in 151,936 rows). The frozen part is always rows [0, V) with V the base tokenizer's length; the
padding rows [V, R) become the first new rows ("reuse"), so the ids the merged tokenizer gives its new tokens
(V, V + 1, ...) are their rows, and the model has max(R, V') rows.

The names of the two parameters are this module's contract with the optimizer groups, the parameter
counts and the export: they use ``BASE_ROWS`` / ``NEW_ROWS`` and ``is_embedding_param``, never literals.
"""

from __future__ import annotations

import contextlib
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

InitMethod = Literal["mean", "subword", "normal"]

BASE_ROWS = "weight_base"  # rows [0, V): the base model's, frozen (trainable only with embeddings: full)
NEW_ROWS = "weight_new"    # rows [V, V'): the appended rows, always trainable


def is_embedding_param(name: str) -> bool:
    """Whether a (qualified) parameter name is one of the split embedding / lm_head matrices."""
    return name.rsplit(".", 1)[-1] in (BASE_ROWS, NEW_ROWS)


def is_new_rows(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == NEW_ROWS


def _as_param(t: torch.Tensor, trainable: bool) -> nn.Parameter:
    # Keep an existing Parameter object: under ZeRO-3 it carries its partition (ds_id, ds_tensor), and
    # wrapping it in a new Parameter would lose that.
    p = t if isinstance(t, nn.Parameter) else nn.Parameter(t)
    p.requires_grad_(trainable)
    return p


class SplitEmbedding(nn.Module):
    """An embedding whose rows below ``orig_vocab`` are frozen and whose rows above are trainable.

    ``train_base=True`` makes the old rows trainable too (the paper's choice, ``embeddings: full``),
    keeping the same module and checkpoint layout.
    """

    def __init__(self, base: torch.Tensor, new_rows: torch.Tensor, orig_vocab: int | None = None,
                 new_vocab: int | None = None, padding_idx: int | None = None, train_base: bool = False):
        super().__init__()
        # Sizes are passed in because a partitioned weight has shape 0 under ZeRO-3.
        self.orig_vocab = int(orig_vocab if orig_vocab is not None else base.shape[0])
        self.new_vocab = int(new_vocab if new_vocab is not None else self.orig_vocab + new_rows.shape[0])
        self.padding_idx = padding_idx
        self.weight_base = _as_param(base, train_base)
        self.weight_new = _as_param(new_rows, True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.orig_vocab
        old = F.embedding(ids.clamp(max=self.orig_vocab - 1), self.weight_base)
        new = F.embedding((ids - self.orig_vocab).clamp(min=0), self.weight_new)
        return torch.where(is_new.unsqueeze(-1), new, old)

    def full_weight(self) -> torch.Tensor:
        return torch.cat([self.weight_base, self.weight_new], dim=0)


class SplitLMHead(nn.Module):
    """The output projection with the same split: logits = [h @ W_base^T, h @ W_new^T].

    Called with ``labels`` it returns their NLL instead of the logits, computed chunk by chunk over the two
    parts (model/loss.py) so the (tokens x V') logits never exist. The loss runs inside this module's forward
    on purpose: under ZeRO-3 the module's hooks gather both weights around it and again before its backward.
    """

    def __init__(self, base: torch.Tensor, new_rows: torch.Tensor, orig_vocab: int | None = None,
                 new_vocab: int | None = None, train_base: bool = False):
        super().__init__()
        self.orig_vocab = int(orig_vocab if orig_vocab is not None else base.shape[0])
        self.new_vocab = int(new_vocab if new_vocab is not None else self.orig_vocab + new_rows.shape[0])
        self.weight_base = _as_param(base, train_base)
        self.weight_new = _as_param(new_rows, True)

    @classmethod
    def tied_to(cls, emb: SplitEmbedding) -> "SplitLMHead":
        """The head of a tied model: the embedding's own two Parameters (registered here too, so ZeRO-3's hooks
        gather them around the head's forward and backward), never copies."""
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.orig_vocab, head.new_vocab = emb.orig_vocab, emb.new_vocab
        head.weight_base = emb.weight_base
        head.weight_new = emb.weight_new
        return head

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                reduction: Literal["none", "sum"] = "none", kernel: str = "torch") -> torch.Tensor:
        """Logits (..., V'); or, given ``labels`` (N,) aligned with ``hidden`` (N, H) (ignored: -100), the fp32
        per-token NLL (N,) (``reduction="none"``) or its sum (``"sum"``, which may use a fused ``kernel``)."""
        if labels is None:
            return torch.cat([F.linear(hidden, self.weight_base), F.linear(hidden, self.weight_new)], dim=-1)
        from .loss import split_linear_cross_entropy, split_linear_token_nll

        weights = [self.weight_base, self.weight_new]  # the Parameters themselves (model/loss.py: ZeRO-3)
        if reduction == "none":
            return split_linear_token_nll(hidden, weights, labels)
        return split_linear_cross_entropy(hidden, weights, labels, backend=kernel)[0]  # type: ignore[arg-type]

    def full_weight(self) -> torch.Tensor:
        return torch.cat([self.weight_base, self.weight_new], dim=0)


def new_row_values(base: torch.Tensor, n_new: int, method: InitMethod, std: float = 0.02,
                   subword_ids: Sequence[Sequence[int]] | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial values of the appended rows.

    - ``mean``: every new row is the mean of the original rows (transformers' default on resize).
    - ``subword``: row i is the mean of the base rows of the pieces the *base* tokenizer splits new
      piece i into (``subword_ids[i]``); a new piece thus starts where its spelling already points.
    - ``normal``: N(0, std), the paper's random initialisation.
    """
    if base.is_meta:  # dry runs: shapes only
        return torch.empty(n_new, base.shape[1], dtype=base.dtype, device="meta")
    base32 = base.detach().float()
    if method == "mean":
        out = base32.mean(dim=0, keepdim=True).expand(n_new, -1).clone()
    elif method == "normal":
        out = torch.randn(n_new, base.shape[1], generator=generator) * std
    elif method == "subword":
        if subword_ids is None or len(subword_ids) != n_new:
            raise ValueError(f"subword init needs the base ids of all {n_new} new pieces")
        mean = base32.mean(dim=0)
        out = torch.stack([base32[list(ids)].mean(dim=0) if len(ids) else mean for ids in subword_ids])
    else:
        raise ValueError(f"unknown init method {method!r}; expected mean, subword or normal")
    return out.to(base.dtype)


def subword_ids_for(new_pieces: Sequence[str], base_sp) -> list[list[int]]:
    """How the base SentencePiece model spells each new piece ("▁" read as a leading space)."""
    texts = [p.replace("▁", " ") for p in new_pieces]
    encoded = base_sp.encode(texts)
    out = []
    for text, ids in zip(texts, encoded):
        # The base adds a dummy "▁" in front; drop it unless the piece itself starts with a space.
        if ids and not text.startswith(" ") and base_sp.id_to_piece(ids[0]) == "▁":
            ids = ids[1:]
        out.append(ids)
    return out


def _gathered(params: list[nn.Parameter]):
    """Context in which ZeRO-3-partitioned ``params`` hold their full values on every rank (read-only)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def is_tied(model: nn.Module) -> bool:
    """Whether lm_head is embed_tokens (one matrix), by the modules themselves or, once split, by their Parameters."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None:
        return False
    if isinstance(emb, SplitEmbedding) and isinstance(head, SplitLMHead):
        return head.weight_new is emb.weight_new
    return head.weight is emb.weight


def _tie(model: nn.Module, split: SplitEmbedding) -> None:
    """Make the head the embedding's own Parameters. transformers' ``tie_weights`` (called by resizes and some
    loaders) looks for ``embed_tokens.weight``, which the split modules do not have; the tie is structural here,
    so on this model it only checks that it holds."""
    import types

    model.set_output_embeddings(SplitLMHead.tied_to(split))

    def tie_weights(self, *args, **kwargs):
        if not is_tied(self):
            raise RuntimeError("lm_head is no longer embed_tokens' rows: the tie was broken")

    model.tie_weights = types.MethodType(tie_weights, model)


def extend_vocab(model: nn.Module, orig_vocab: int, new_vocab: int, method: InitMethod = "mean",
                 std: float = 0.02, subword_ids: Sequence[Sequence[int]] | None = None, seed: int = 0,
                 train_base: bool = False, rows: int | None = None) -> None:
    """Replace a LLaMA-architecture model's embed_tokens and lm_head by split modules.

    ``orig_vocab``: the base tokenizer's length V (rows below it are frozen); ``new_vocab``: the merged
    tokenizer's V'; ``rows``: the model's row count R (its config.vocab_size; default V). The model ends with
    max(R, V') rows: the padding rows [V, R) are reused first, for the new tokens V.., and are initialised like
    appended rows; padding rows no token reaches (>= V') keep their values. A tied model stays tied: one block
    of new rows, one set of initial values (from the one matrix).

    Works on a full model and on one partitioned by ZeRO-3: when R == V the original weight Parameter is reused
    as the frozen part (its partition untouched, so the old rows stay bit-identical), else rows [0, V) are
    copied exactly from the gathered weight; the initial values of the new rows are computed from the gathered
    original rows identically on every rank. The new rows are ordinary parameters until
    ``deepspeed.initialize`` partitions them; a second ``zero.Init`` here would re-create ZeRO++'s hierarchical
    groups, which DeepSpeed refuses.
    """
    rows = orig_vocab if rows is None else rows
    if new_vocab < orig_vocab:
        raise ValueError(f"new vocabulary {new_vocab} is smaller than the original {orig_vocab}")
    if rows < orig_vocab:
        raise ValueError(f"the model has {rows} rows, fewer than its tokenizer's {orig_vocab} tokens")
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = is_tied(model)
    # ds_shape is the full shape of a partitioned weight; shape is right for an ordinary one.
    have = getattr(emb.weight, "ds_shape", emb.weight.shape)[0]
    if have != rows:
        raise ValueError(f"embed_tokens has {have} rows, the config says {rows}")
    total = max(rows, new_vocab)
    gen = torch.Generator().manual_seed(seed)
    n_init = new_vocab - orig_vocab  # rows that new tokens take (padding rows first)
    weights = [emb.weight] + ([head.weight] if head is not None and not tied else [])
    with _gathered(weights):
        def parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            base = w if rows == orig_vocab else w.detach()[:orig_vocab].clone()
            new = new_row_values(w.detach()[:orig_vocab], n_init, method, std, subword_ids, gen)
            if total > new_vocab:  # padding rows beyond every token: kept as the base had them
                new = torch.cat([new, w.detach()[new_vocab:rows].clone()])
            return base, new

        e_base, e_new = parts(emb.weight)
        h_base, h_new = parts(head.weight) if head is not None and not tied else (None, None)
    split = SplitEmbedding(e_base, e_new, orig_vocab, total, getattr(emb, "padding_idx", None), train_base)
    model.set_input_embeddings(split)
    if tied:
        _tie(model, split)
    elif head is not None:
        model.set_output_embeddings(SplitLMHead(h_base, h_new, orig_vocab, total, train_base))
    model.config.vocab_size = total


def split_vocab(model: nn.Module, orig_vocab: int, new_vocab: int, train_base: bool = False) -> None:
    """Split a model whose vocabulary is already extended (a merged pre-trained model: embed_tokens and lm_head
    of ``new_vocab`` rows) at ``orig_vocab``, into the same frozen/trainable parts ``extend_vocab`` makes.

    Instruction tuning starts here: the rows the pre-training learned stay the trainable part, the original
    LLaMA rows the frozen part, both exact copies of the loaded values (under ZeRO-3 gathered first; the copies
    are ordinary parameters that ``deepspeed.initialize`` partitions). A tied model stays tied.
    """
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = is_tied(model)
    rows = getattr(emb.weight, "ds_shape", emb.weight.shape)[0]
    if rows < new_vocab:
        raise ValueError(f"embed_tokens has {rows} rows, fewer than the extended vocabulary's {new_vocab}")
    with _gathered([emb.weight] + ([head.weight] if head is not None and not tied else [])):
        e_base, e_new = (emb.weight.detach()[:orig_vocab].clone(), emb.weight.detach()[orig_vocab:].clone())
        if head is not None and not tied:
            h_base, h_new = (head.weight.detach()[:orig_vocab].clone(), head.weight.detach()[orig_vocab:].clone())
    split = SplitEmbedding(e_base, e_new, orig_vocab, rows, getattr(emb, "padding_idx", None), train_base)
    model.set_input_embeddings(split)
    if tied:
        _tie(model, split)
    elif head is not None:
        model.set_output_embeddings(SplitLMHead(h_base, h_new, orig_vocab, rows, train_base))
    model.config.vocab_size = rows
