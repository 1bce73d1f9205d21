"""The trainer's data: one shard folder, or several sets mixed by weight (data.sets).

Each set is checked as one folder always was (its manifest against the run's tokenizer and block size, every
shard verified), and a refusal names the set. The train order is ``loader.GlobalOrder`` for one folder (the
order, and so the resume of its checkpoints, unchanged) and ``loader.MixedOrder`` for a mixture; validation
runs per set (validate.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.config import DataConfig, DataSetConfig
from ..data.loader import GlobalOrder, MixedOrder, require_boundaries
from ..data.shards import (
    PRETRAIN_FORMATS,
    SFT_FORMAT,
    check_manifest,
    load_manifest,
    verify_shards,
)
from ..errors import UserError
from ..files import os_error
from .batches import open_data


@dataclass
class ShardSet:
    cfg: DataSetConfig
    manifest: dict
    document_mask: bool = False  # data.document_mask: keep the documents of a block apart (trainer/batches.py)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def path(self) -> str:
        return self.cfg.path


def read_sets(data: DataConfig, fingerprint: dict) -> tuple[list[ShardSet], int]:
    """Every set's manifest, checked against the tokenizer and one block size; returns (sets, block size).

    The block size is data.block_size, or the first set's; every other set must hold the same."""
    sets = data.mixture()
    if not sets:
        raise UserError("data.path is required: the preprocessor's output folder (or data.sets, a mixture)")
    out = []
    block = data.block_size
    for s in sets:
        where = f"shards in {s.path}" if not data.sets else f"set {s.name!r} ({s.path})"
        try:
            manifest = load_manifest(s.path, formats=(*PRETRAIN_FORMATS, SFT_FORMAT))
        except UserError as exc:
            raise UserError(f"set {s.name!r}: {exc}" if data.sets else str(exc)) from None
        block = block or int(manifest["block_size"])
        check_manifest(manifest, fingerprint, block, where=where)
        if out and _kind(manifest) != _kind(out[0].manifest):
            raise UserError(f"set {s.name!r} ({s.path}) holds {_kind(manifest)}, set {out[0].name!r} holds "
                            f"{_kind(out[0].manifest)}: a mixture reads one kind of rows")
        if data.document_mask and manifest.get("format") != SFT_FORMAT:
            require_boundaries(manifest, f"the shards in {s.path} were" if not data.sets else
                               f"set {s.name!r} ({s.path}) was", prefix="data.document_mask: ")
        out.append(ShardSet(s, manifest, data.document_mask))
    return out, block


def _kind(manifest: dict) -> str:
    if manifest.get("format") == SFT_FORMAT:
        return f"instruction-tuning rows ({manifest.get('layout')})"
    return "pre-training blocks"


def verify(sets: list[ShardSet], vocab: int, run_dir: Path, rank: int, world: int, single: bool) -> dict:
    """Verify every set's shards (each rank its share), summing what was done. A single folder keeps the
    verification record it always had (.verified/rank-N.json); a mixture keeps one per set."""
    total = {"shards": 0, "bytes": 0, "from_record": 0, "seconds": 0.0}
    for s in sets:
        folder = run_dir / ".verified" / ("" if single else f"set-{s.name}")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, folder, "create") from None
        try:
            done = verify_shards(s.path, s.manifest, vocab, checksums=True, which=(rank, world),
                                 record=folder / f"rank-{rank}.json")
        except UserError as exc:
            raise UserError(str(exc) if single else f"set {s.name!r}: {exc}") from None
        for k in total:
            total[k] += done[k]
    return total


class MixedData:
    """Several sets' data (trainer/batches.py's PretrainData or SFTData, one kind) as one index space: set 0's
    rows, then set 1's, ...: what ``MixedOrder.indices`` addresses, so the loop reads a mixture with the calls it
    reads one folder with (``rows``, ``loss_tokens``)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.kind, self.block, self.token_loss = parts[0].kind, parts[0].block, parts[0].token_loss
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _split(self, indices: np.ndarray):
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        for p in np.unique(part).tolist():
            here = np.flatnonzero(part == p)
            yield p, here, idx[here] - self.starts[p]

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        n = len(np.asarray(indices).reshape(-1))
        out: dict[str, np.ndarray] = {}
        for p, here, local in self._split(indices):
            for key, value in self.parts[p].rows(local).items():
                if key not in out:
                    out[key] = np.empty((n, *value.shape[1:]), dtype=value.dtype)
                out[key][here] = value
        return out

    def loss_tokens(self, indices: np.ndarray) -> int:
        return sum(self.parts[p].loss_tokens(local) for p, _, local in self._split(indices))


def train_data(sets: list[ShardSet], seed: int, single: bool):
    """(data, order): what the loop reads with ``data.rows(order.indices(positions))``."""
    if single:
        data = open_data(sets[0].path, sets[0].manifest, "train", sets[0].document_mask)
        return data, GlobalOrder(len(data), seed)
    parts = [open_data(s.path, s.manifest, "train", s.document_mask) for s in sets]
    for s, p in zip(sets, parts):
        if len(p) == 0:
            raise UserError(f"set {s.name!r} ({s.path}): the train split has no sequences")
    order = MixedOrder([len(p) for p in parts], [s.cfg.weight for s in sets], [s.name for s in sets], seed)
    return MixedData(parts), order


def identity(sets: list[ShardSet], order, single: bool) -> list[dict]:
    """What a resume must keep for the order to continue: each set's name, weight and size ([] for one folder)."""
    if single:
        return []
    return [{"name": s.name, "weight": s.cfg.weight, "sequences": n} for s, n in zip(sets, order.sizes)]


def content_identity(sets: list[ShardSet]) -> list[dict]:
    """Per shard folder, the digest of its train shards (file names and sha256, as the manifest lists them): the
    same tokenizer's other shards, of the same size even, are other data at the same sample offset."""
    out = []
    for s in sets:
        listed = s.manifest["splits"]["train"]["shards"]
        digest = hashlib.sha256("\n".join(f"{x['file']} {x['sha256']}" for x in listed).encode()).hexdigest()
        out.append({"path": str(s.path), "sha256": digest})
    return out
