"""Validation during training: loss, perplexity and bits per character / per UTF-8 byte on the first N
validation sequences of each shard set.

Bits per character = total NLL (nats) / ln 2 / characters of the text the evaluated sequences' tokens came
from (the preprocessor's n_chars column, format cllama-shards/2); unlike the loss it compares tokenizers and
languages. Shards of format /1 lack the column: their sets report loss and perplexity only, and say so once.

On instruction-tuning shards the loss is the response tokens' only (the same mask as training).
With data.document_mask, blocks are scored as they train: documents kept apart, document starts unscored.

Every rank takes its share of the sequences (``data/loader.eval_batches``: the same number of batches on
every rank, because a ZeRO-3 forward is a collective); the scores are model/scoring.py's, the same
function ``cllama eval`` uses, so both report the same loss for the same model and tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .. import distributed as dist
from ..data.loader import eval_batches, text_sizes
from ..data.shards import SFT_FORMAT
from ..model.scoring import causal_nll, masked_nll
from .batches import open_data


class Validator:
    def __init__(self, blocks, micro: int, sequences: int = 0, sizes: tuple[np.ndarray, np.ndarray] | None = None):
        """``blocks``: trainer/batches.py's PretrainData or SFTData; ``sizes``: (characters, UTF-8 bytes) per
        validation sequence, or None (no bits per character)."""
        self.blocks, self.micro = blocks, micro
        self.n = min(len(blocks), sequences or len(blocks))
        self.chars = self.bytes = None
        if sizes is not None:
            self.chars, self.bytes = int(sizes[0][:self.n].sum()), int(sizes[1][:self.n].sum())

    @torch.no_grad()
    def run(self, engine, to_device: Callable[[dict], dict]) -> dict[str, float] | None:
        if self.n == 0:
            return None
        engine.eval()
        nll = count = 0.0
        for idx, w in eval_batches(self.n, self.micro, dist.rank(), dist.world_size()):
            rows = self.blocks.rows(idx)
            inputs = dict(to_device(rows))
            labels = inputs.pop("labels", None)
            if labels is not None:  # instruction rows, or blocks whose documents are kept apart (data.document_mask)
                row_nll, row_count = masked_nll(engine, inputs, labels)
            else:
                row_nll, row_count = causal_nll(engine, inputs["input_ids"])
            weight = torch.from_numpy(w)
            nll += float((row_nll.double().cpu() * weight).sum())
            count += float((row_count.double().cpu() * weight).sum())
        engine.train()
        total_nll = dist.total(nll)
        loss = total_nll / max(dist.total(count), 1.0)
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        if self.chars:
            out["bits_per_char"] = total_nll / math.log(2) / self.chars
            out["bits_per_byte"] = total_nll / math.log(2) / self.bytes
        return out


class Validators:
    """One Validator per shard set. A single folder reports as it always did (loss, perplexity, and now bits
    per character); a mixture reports each set under its name (``zh/loss``, ``zh/bits_per_char``, ...) and
    ``loss`` over the validation tokens of all sets together."""

    def __init__(self, sets, micro: int, sequences: int, single: bool):
        self.single = single
        self.parts: list[tuple[str, Validator]] = []
        self.notes: list[str] = []
        for s in sets:
            sizes = text_sizes(s.path, s.manifest, "validation")
            if sizes is None and s.manifest.get("format") != SFT_FORMAT:  # instruction rows: response tokens only
                self.notes.append(f"note: {'the shards' if single else 'set ' + repr(s.name)} ({s.path}, format "
                                  f"{s.manifest.get('format')}) record no character counts: bits per character "
                                  "left out (re-run `cllama preprocess` to get them)")
            data = open_data(s.path, s.manifest, "validation", s.document_mask)
            self.parts.append((s.name, Validator(data, micro, sequences, sizes)))

    def run(self, engine, to_device) -> dict[str, float] | None:
        results = [(name, v.n, v.run(engine, to_device)) for name, v in self.parts]
        results = [(name, n, r) for name, n, r in results if r is not None]
        if not results:
            return None
        if self.single:
            return results[0][2]
        out: dict[str, float] = {}
        for name, _, r in results:
            out.update({f"{name}/{k}": v for k, v in r.items()})
        # the pooled loss: each set's mean weighted by its evaluated tokens (blocks x (block - 1) targets each)
        tokens = [(n, r["loss"]) for _, n, r in results]
        out["loss"] = sum(n * loss for n, loss in tokens) / sum(n for n, _ in tokens)
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        return out

    def line(self, step: int, r: dict[str, float]) -> str:
        def one(prefix: str) -> str:
            text = f"loss {r[prefix + 'loss']:.4f}, perplexity {r[prefix + 'perplexity']:.2f}"
            if prefix + "bits_per_char" in r:
                text += f", {r[prefix + 'bits_per_char']:.4f} bits/char, {r[prefix + 'bits_per_byte']:.4f} bits/byte"
            return text

        if self.single:
            return f"step {step}: validation {one('')}"
        names = [name for name, _ in self.parts if f"{name}/loss" in r]
        return f"step {step}: validation " + "; ".join(f"{name}: {one(name + '/')}" for name in names)
