"""The trainer's data: one shard folder, or several sets mixed by weight (data.sets).

Each set is checked as one folder always was (its manifest against the run's tokenizer and block size, every
shard verified), and a refusal names the set. The train order is ``loader.GlobalOrder`` for one folder (the
order, and so the resume of its checkpoints, unchanged) and ``loader.MixedOrder`` for a mixture; validation
runs per set (validate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.config import DataConfig, DataSetConfig
from ..data.loader import GlobalOrder, MixedBlocks, MixedOrder, TokenBlocks
from ..data.shards import check_manifest, load_manifest, verify_shards
from ..errors import UserError
from ..files import os_error


@dataclass
class ShardSet:
    cfg: DataSetConfig
    manifest: dict

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
            manifest = load_manifest(s.path)
        except UserError as exc:
            raise UserError(f"set {s.name!r}: {exc}" if data.sets else str(exc)) from None
        block = block or int(manifest["block_size"])
        check_manifest(manifest, fingerprint, block, where=where)
        out.append(ShardSet(s, manifest))
    return out, block


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


def train_data(sets: list[ShardSet], seed: int, single: bool):
    """(blocks, order): what the loop reads with ``blocks.take(order.indices(positions))``."""
    if single:
        blocks = TokenBlocks(sets[0].path, sets[0].manifest, "train")
        return blocks, GlobalOrder(len(blocks), seed)
    parts = [TokenBlocks(s.path, s.manifest, "train") for s in sets]
    for s, p in zip(sets, parts):
        if len(p) == 0:
            raise UserError(f"set {s.name!r} ({s.path}): the train split has no sequences")
    order = MixedOrder([len(p) for p in parts], [s.cfg.weight for s in sets], [s.name for s in sets], seed)
    return MixedBlocks(parts), order


def identity(sets: list[ShardSet], order, single: bool) -> list[dict]:
    """What a resume must keep for the order to continue: each set's name, weight and size ([] for one folder)."""
    if single:
        return []
    return [{"name": s.name, "weight": s.cfg.weight, "sequences": n} for s, n in zip(sets, order.sizes)]
