"""Attention that does not cross examples (or documents) packed into one row.

A packed row holds several examples back to back. With a plain causal mask, the second example attends to
the first one, and its positions continue where the first stopped: what it learns then depends on its
neighbour. Two things make each example see exactly what it would see alone:

- position ids restarting at 0 at every example start (rotary embeddings are relative, but the restart
  keeps positions within the range the model was trained on and equal to the unpacked example's);
- a block-diagonal causal mask: a token attends to an earlier (or the same) token of its own example only.

The mask is built in the form each attention implementation honours: a boolean (B, 1, T, T) tensor for
``sdpa`` (True = attend), an additive float tensor for ``eager``; ``flash_attention_2`` takes no 4-D mask
and reads the example boundaries from the position-id restarts (transformers' varlen path, which it takes
only for a batch of one row: more rows are refused rather than silently attending across examples).

Padding tokens (segment 0) attend to themselves only: a query with nothing to attend to gives NaN in
``sdpa``, and although their loss is masked, NaN would reach the gradients through the backward pass.
Used by the instruction-tuning stage (packed examples) and by pre-training with recorded document
boundaries (``data.document_mask``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError


def positions_from_segments(segments: np.ndarray) -> np.ndarray:
    """(B, T) position ids restarting at 0 at each change of segment id (padding counts as its own segment)."""
    seg = np.asarray(segments)
    b, t = seg.shape
    pos = np.zeros((b, t), dtype=np.int64)
    if t == 0:
        return pos
    starts = np.ones((b, t), dtype=bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    idx = np.broadcast_to(np.arange(t), (b, t))
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    pos[:] = idx - last_start
    return pos


def document_mask(segments: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The 4-D attention mask for rows whose tokens carry segment ids (1, 2, ... per example; 0 on padding).

    Returns None for ``flash_attention_2`` (which reads the position-id restarts instead).
    """
    if implementation == "flash_attention_2":
        if segments.shape[0] > 1:  # a shape, not a value: no host synchronisation
            raise UserError(f"flash_attention_2 keeps packed examples or documents apart only with one row per "
                            f"micro-batch (transformers reads the position-id restarts at batch size 1 only), got "
                            f"{segments.shape[0]} rows: set data.micro_batch_size: 1, or model.attn_implementation: "
                            "sdpa")
        return None
    seg = segments.long()
    t = seg.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    same = seg[:, :, None] == seg[:, None, :]
    real = (seg > 0)[:, :, None]
    eye = torch.eye(t, dtype=torch.bool, device=seg.device)
    allowed = (same & real & causal) | eye  # padding: itself only (see the module note)
    allowed = allowed[:, None]  # (B, 1, T, T): one mask for every head
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        out = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)
    raise ValueError(f"no document mask for attention implementation {implementation!r} "
                     "(supported: sdpa, eager, flash_attention_2)")
