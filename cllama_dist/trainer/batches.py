"""What a run reads, as the model is fed it: pre-training blocks or instruction-tuning rows.

The loop and the validator see one interface whatever the shards hold (the manifest's format decides):

- ``PretrainData``: every token is predicted from its predecessors (labels = input_ids), one block per row;
  with ``data.document_mask`` the documents packed into a block are kept apart as packed examples are (the
  same segments, mask and position ids), and a document's first token is not predicted from its predecessor.
- ``SFTData``: the loss counts only where the shards' loss mask is 1 (responses and their EOS), labels are
  -100 elsewhere; packed rows get position ids restarting at every example and a block-diagonal mask
  (model/packing.py), so no example attends to its neighbours; padding needs no vocabulary row: the pad id
  is an existing piece that the causal mask (padding follows the real tokens) and the labels ignore.

``loss_tokens(step)`` is the number of positions scored in a whole optimizer step over all ranks, counted
locally (every rank reads the masks of the step's rows; no collective): the loss of a micro-batch is its
summed token NLL divided by that count, so every response token weighs the same across the global batch
(not per micro-batch, which would over-weigh the tokens of short responses). ``token_loss`` says a data
takes that path; plain pre-training blocks keep Hugging Face's mean (every micro-batch has the same count).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.loader import BoundaryBlocks, SFTBlocks, TokenBlocks, segment_ids, segments_from_starts
from ..data.shards import SFT_FORMAT
from ..model.packing import document_mask, positions_from_segments

IGNORE = -100  # the label Hugging Face's loss (and ours) skips


class PretrainData:
    """Pre-training blocks. With ``document_mask`` (data.document_mask; shards made with --record-boundaries)
    each document of a block is trained as if it were alone: segments from the recorded boundaries give the
    block-diagonal mask, position ids restart at 0 at every document start (what the document would see alone,
    and the boundaries flash_attention_2 reads), and the label at a document start is IGNORE (it would be
    predicted from the previous document, which the mask hides; alone, a document's first token is not predicted
    either), so ``loss_tokens`` counts block - 1 targets per row minus the documents starting after offset 0."""

    kind = "pretrain"

    def __init__(self, folder: str, manifest: dict, split: str, document_mask: bool = False):
        self.document_mask = document_mask
        self.blocks = (BoundaryBlocks if document_mask else TokenBlocks)(folder, manifest, split)
        self.block = self.blocks.block_size
        # summed NLL over loss_tokens (as instruction tuning) rather than Hugging Face's mean per micro-batch:
        # with some labels ignored, micro-batches hold different numbers of targets
        self.token_loss = document_mask

    def __len__(self) -> int:
        return len(self.blocks)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        ids = self.blocks.take(indices)
        if not self.document_mask:
            return {"input_ids": ids}
        starts = self.blocks.doc_starts(indices)
        seg = segments_from_starts(starts, np.full(len(ids), self.block), self.block)
        labels = ids.copy()
        labels[:, 1:][seg[:, 1:] != seg[:, :-1]] = IGNORE  # each document's first token, not predicted across
        return {"input_ids": ids, "labels": labels, "segments": seg, "position_ids": positions_from_segments(seg)}

    def loss_tokens(self, indices: np.ndarray) -> int:
        idx = np.asarray(indices).reshape(-1)
        total = len(idx) * (self.block - 1)
        if self.document_mask and len(idx):
            total -= sum(int((s > 0).sum()) for s in self.blocks.doc_starts(idx))
        return total


class SFTData:
    kind = "sft"
    token_loss = True  # the loss is summed NLL over loss_tokens (the response tokens of the whole step)

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


def open_data(folder: str, manifest: dict, split: str, document_mask: bool = False):
    """The data of one shard folder's split; ``document_mask`` (pre-training shards only: instruction-tuning rows
    are always kept apart) keeps the documents of a block apart."""
    if manifest.get("format") == SFT_FORMAT:
        return SFTData(folder, manifest, split)
    return PretrainData(folder, manifest, split, document_mask)


def model_inputs(rows: dict[str, np.ndarray], device: str, attn_implementation: str,
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The keyword arguments of the model's forward for ``rows`` (PretrainData/SFTData.rows), on ``device``, and
    the rows' ``labels`` where they carry any (instruction rows, document-masked blocks): the caller pops them.
    Every tensor goes through the same pinned, non-blocking copy, so that DeviceCopier prefetches the labels
    with the inputs; a copy from pageable memory would make the host wait for the GPU's queue inside the
    micro-batch loop."""
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
    if "labels" in rows:
        out["labels"] = put(rows["labels"])
    return out


class DeviceCopier:
    """Micro-batches copied to the device one ahead, while the current one computes.

    ``stream(items)`` yields the items (numpy rows) in order; as item k is yielded, item k+1 is already being
    converted (``convert``: rows -> the forward's tensors, ``model_inputs``) into pinned host memory and sent
    on a side CUDA stream, so the host-to-device copy and the host-side work of building the inputs (the
    memory-mapped gather, a packed row's document mask) overlap the compute of item k instead of preceding
    item k+1's. ``take(rows)`` returns the tensors of ``rows``: the prefetched ones when ``rows`` is the item
    prefetched, else converted now (a caller that does not stream still gets correct inputs).

    Ordering on the GPU: the compute stream waits for the side stream's event before using a prefetched batch,
    and each tensor is marked as used by the compute stream (``record_stream``) so the caching allocator never
    hands its memory to the next copy while a kernel still reads it. On the CPU (``ahead`` 0) nothing is
    prefetched: ``take`` converts directly, as before.
    """

    def __init__(self, convert, device: str, ahead: int | None = None):
        self.convert, self.device = convert, device
        self.cuda = device.startswith("cuda")
        self.ahead = (1 if self.cuda else 0) if ahead is None else ahead
        self.side = torch.cuda.Stream(device=device) if self.cuda and self.ahead else None
        self.ready: list[tuple[dict, dict[str, torch.Tensor], object]] = []  # (rows, tensors, event)

    def _start(self, rows: dict) -> None:
        if self.side is None:
            self.ready.append((rows, self.convert(rows), None))
            return
        with torch.cuda.stream(self.side):
            tensors = self.convert(rows)  # pinned + non_blocking copies, queued on the side stream
            event = torch.cuda.Event()
            event.record(self.side)
        self.ready.append((rows, tensors, event))

    def stream(self, items):
        """The items in order, each one's tensors started ``ahead`` items before it is yielded."""
        it = iter(items)
        pending: list[dict] = []
        for rows in it:
            pending.append(rows)
            if self.ahead:
                self._start(rows)
            if len(pending) > self.ahead:
                yield pending.pop(0)
        while pending:
            yield pending.pop(0)

    def take(self, rows: dict) -> dict[str, torch.Tensor]:
        for i, (r, tensors, event) in enumerate(self.ready):
            if r is rows:
                del self.ready[:i + 1]  # older entries were skipped (a step cut short): dropped
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for t in tensors.values():
                        t.record_stream(current)
                return tensors
        return self.convert(rows)
