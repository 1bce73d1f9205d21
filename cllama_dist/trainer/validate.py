"""Validation during training: loss and perplexity on the first N validation sequences.

On instruction-tuning shards the loss is the response tokens' only (the same mask as training).

Every rank takes its share of the sequences (``data/loader.eval_batches``: the same number of batches on
every rank, because a ZeRO-3 forward is a collective); the scores are model/scoring.py's, the same
function ``cllama eval`` uses, so both report the same loss for the same model and tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .. import distributed as dist
from ..data.loader import eval_batches
from ..model.scoring import causal_nll, masked_nll
from .batches import labels_of


class Validator:
    def __init__(self, blocks, micro: int, sequences: int = 0):
        # blocks: trainer/batches.py's PretrainData or SFTData
        self.blocks, self.micro = blocks, micro
        self.n = min(len(blocks), sequences or len(blocks))

    @torch.no_grad()
    def run(self, engine, to_device: Callable[[dict], dict]) -> dict[str, float] | None:
        if self.n == 0:
            return None
        engine.eval()
        nll = count = 0.0
        for idx, w in eval_batches(self.n, self.micro, dist.rank(), dist.world_size()):
            rows = self.blocks.rows(idx)
            inputs = to_device(rows)
            if self.blocks.kind == "sft":
                row_nll, row_count = masked_nll(engine, inputs, labels_of(rows, str(inputs["input_ids"].device)))
            else:
                row_nll, row_count = causal_nll(engine, inputs["input_ids"])
            weight = torch.from_numpy(w)
            nll += float((row_nll.double().cpu() * weight).sum())
            count += float((row_count.double().cpu() * weight).sum())
        engine.train()
        loss = dist.total(nll) / max(dist.total(count), 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
