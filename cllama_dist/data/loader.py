"""Training batches from the preprocessor's shards: memory-mapped, in a deterministic global order.

The order is a function of (seed, epoch) alone and is addressed by a *global sample position*: position
p is sequence ``perm(epoch = p // n)[p % n]``. Step s consumes positions [s x G, (s + 1) x G) for a
global batch of G sequences, split across processes and micro-batches. A checkpoint stores only the
position, so a resume seeks to it and replays nothing; with the same G the same sequences form each
step whatever the number of processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .shards import shard_tokens


class TokenBlocks:
    """All sequences of one split as (n, block_size) memory maps, indexed globally."""

    def __init__(self, folder: str | Path, manifest: dict, split: str):
        info = manifest["splits"].get(split, {"shards": []})
        self.block_size = int(manifest["block_size"])
        self.arrays = [shard_tokens(Path(folder) / s["file"]) for s in info["shards"]]
        for s, a in zip(info["shards"], self.arrays):
            if a.shape[0] != s["sequences"]:
                raise UserError(f"shard {s['file']} holds {a.shape[0]} sequences, the manifest says {s['sequences']}")
        sizes = [a.shape[0] for a in self.arrays]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = int(self.starts[-1])

    def __len__(self) -> int:
        return self.n

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` as one int64 array (k, block_size)."""
        out = np.empty((len(indices), self.block_size), dtype=np.int64)
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        for i, (s, idx) in enumerate(zip(shard, indices)):
            out[i] = self.arrays[s][idx - self.starts[s]]
        return out


class GlobalOrder:
    """Sample position -> sequence index: a fresh seeded permutation every epoch."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise UserError("the train split has no sequences: nothing to train on")
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._cache[epoch]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.n)
        return np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)


def step_positions(step: int, global_batch: int, micro: int, dp_rank: int, dp_world: int) -> list[np.ndarray]:
    """Global positions of this process's micro-batches in optimizer step ``step``.

    Micro-batch k of rank r holds positions base + k·micro·world + r·micro + [0, micro): every rank
    walks the step's slice in lockstep, and the union over ranks is the whole slice.
    """
    base = step * global_batch
    accum = global_batch // (micro * dp_world)
    return [base + k * micro * dp_world + dp_rank * micro + np.arange(micro) for k in range(accum)]


def eval_batches(n: int, micro: int, dp_rank: int, dp_world: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validation micro-batches of this rank as (indices, weights): rank r takes r, r + world, ...

    Every rank gets the same number of batches, because a ZeRO-3 forward is a collective; slots past
    the end of the split are filled with sequence 0 at weight 0.
    """
    per_rank = -(-n // dp_world)
    pos = dp_rank + dp_world * np.arange(per_rank, dtype=np.int64)
    valid = pos < n
    idx, weight = np.where(valid, pos, 0), valid.astype(np.float64)
    return [(idx[i:i + micro], weight[i:i + micro]) for i in range(0, per_rank, micro)]
