"""What a run reads, as the model is fed it: pre-training blocks or instruction-tuning rows.

The loop and the validator see one interface whatever the shards hold (the manifest's format decides):

- ``PretrainData``: every token is predicted from its predecessors (labels = input_ids), one block per row.
- ``SFTData``: the loss counts only where the shards' loss mask is 1 (responses and their EOS), labels are
  -100 elsewhere; packed rows get position ids restarting at every example and a block-diagonal mask
  (model/packing.py), so no example attends to its neighbours; padding needs no vocabulary row: the pad id
  is an existing piece that the causal mask (padding follows the real tokens) and the labels ignore.

``loss_tokens(step)`` is the number of positions scored in a whole optimizer step over all ranks, counted
locally (every rank reads the masks of the step's rows; no collective): the loss of a micro-batch is its
summed token NLL divided by that count, so every response token weighs the same across the global batch
(not per micro-batch, which would over-weigh the tokens of short responses).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.loader import SFTBlocks, TokenBlocks, segment_ids
from ..data.shards import SFT_FORMAT
from ..model.packing import document_mask, positions_from_segments

IGNORE = -100  # the label Hugging Face's loss (and ours) skips


class PretrainData:
    kind = "pretrain"

    def __init__(self, folder: str, manifest: dict, split: str):
        self.blocks = TokenBlocks(folder, manifest, split)
        self.block = self.blocks.block_size

    def __len__(self) -> int:
        return len(self.blocks)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": self.blocks.take(indices)}

    def loss_tokens(self, indices: np.ndarray) -> int:
        return len(np.asarray(indices).reshape(-1)) * (self.block - 1)


class SFTData:
    kind = "sft"

    def __init__(self, folder: str, manifest: dict, split: str):
        self.blocks = SFTBlocks(folder, manifest, split)
        self.block = self.blocks.block_size
        self.packed = manifest.get("layout") == "packed"

    def __len__(self) -> int:
        return len(self.blocks)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        r = self.blocks.take(indices)
        out = {"input_ids": r.input_ids, "labels": np.where(r.loss_mask.astype(bool), r.input_ids, IGNORE)}
        if self.packed:
            seg = segment_ids(r)
            out["segments"] = seg
            out["position_ids"] = positions_from_segments(seg)
        return out

    def loss_tokens(self, indices: np.ndarray) -> int:
        return self.blocks.predicted_tokens(indices)


def open_data(folder: str, manifest: dict, split: str):
    return (SFTData if manifest.get("format") == SFT_FORMAT else PretrainData)(folder, manifest, split)


def model_inputs(rows: dict[str, np.ndarray], device: str, attn_implementation: str,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward for ``rows`` (PretrainData/SFTData.rows), on ``device``."""
    def put(a: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(a)
        return x.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else x

    out = {"input_ids": put(rows["input_ids"])}
    if "position_ids" in rows:
        out["position_ids"] = put(rows["position_ids"])
    if "segments" in rows:
        mask = document_mask(put(rows["segments"]), attn_implementation, dtype)
        if mask is not None:
            out["attention_mask"] = mask
    return out


def labels_of(rows: dict[str, np.ndarray], device: str) -> torch.Tensor:
    x = torch.from_numpy(rows.get("labels", rows["input_ids"]))
    return x.to(device, non_blocking=True) if device.startswith("cuda") else x
