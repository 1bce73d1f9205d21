"""Training batches from the preprocessor's shards: memory-mapped, in a deterministic global order.

The order is a function of (seed, epoch) alone and is addressed by a *global sample position*: position
p is sequence ``perm(epoch = p // n)[p % n]``. Step s consumes positions [s x G, (s + 1) x G) for a
global batch of G sequences, split across processes and micro-batches. A checkpoint stores only the
position, so a resume seeks to it and replays nothing; with the same G the same sequences form each
step whatever the number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import UserError
from .shards import SFT_FORMAT, MappedBoundaryShard, MappedSFTShard, MappedShard


class TokenBlocks:
    """All sequences of one split, indexed globally, read in place from memory-mapped shards.

    Nothing is copied at start-up: each shard is a ``MappedShard`` (zero-copy views on a read-only map) and only
    the offsets of its record batches are kept (16 bytes per 1,024 sequences), so a rank's memory does not grow
    with the corpus, and the ranks of a node share one copy of the data, the page cache. ``take`` copies only the
    rows asked for.
    """

    shard_class: type = MappedShard
    rows_key = "sequences"  # the shard record's row count

    def __init__(self, folder: str | Path, manifest: dict, split: str):
        if manifest.get("format") == SFT_FORMAT and self.shard_class is not MappedSFTShard:
            raise UserError(f"{folder} holds instruction-tuning shards ({SFT_FORMAT}): read them with SFTBlocks, "
                            "which gives their loss mask and example boundaries too")
        info = manifest["splits"].get(split, {"shards": []})
        self.block_size = int(manifest["block_size"])
        dtype = np.dtype(manifest["dtype"])
        _room_for_open_files(len(info["shards"]))
        key = self.rows_key
        self.shards = [self.shard_class(Path(folder) / s["file"], self.block_size, dtype, int(s[key]),
                                        manifest.get("columns")) for s in info["shards"]]
        for s, m in zip(info["shards"], self.shards):
            if m.rows != s[key]:
                raise UserError(f"shard {m.path} holds {m.rows:,} {'rows' if key == 'rows' else key}, the manifest "
                                f"says {s[key]:,}")
        sizes = [m.rows for m in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n = int(self.starts[-1])
        # One entry per record batch over all shards: its first global row, its shard, its first token's offset.
        self._batch_first = np.concatenate(
            [self.starts[i] + np.concatenate([[0], np.cumsum(m.batch_rows)[:-1]]) for i, m in enumerate(self.shards)
             if len(m.batch_rows)] or [np.zeros(0)]).astype(np.int64)
        self._batch_shard = np.concatenate(
            [np.full(len(m.batch_rows), i) for i, m in enumerate(self.shards)] or [np.zeros(0)]).astype(np.int64)
        self._batch_elem = np.concatenate([m.batch_elem for m in self.shards] or [np.zeros(0)]).astype(np.int64)
        self._cols = np.arange(self.block_size, dtype=np.int64)

    def __len__(self) -> int:
        return self.n

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            bad = idx[(idx < 0) | (idx >= self.n)][0]
            raise IndexError(f"sequence {bad} is outside 0..{self.n - 1}")
        b = self._batches(idx)
        return self._batch_shard[b], self._batch_elem[b] + (idx - self._batch_first[b]) * self.block_size

    def _batches(self, idx: np.ndarray) -> np.ndarray:
        """The global record-batch index of each row in ``idx`` (already range-checked)."""
        return np.searchsorted(self._batch_first, idx, side="right") - 1

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows ``indices`` as one int64 array (k, block_size): a gather per shard touched, no loop per row."""
        shard, first = self._locate(indices)
        out = np.empty((len(first), self.block_size), dtype=np.int64)
        for s in np.unique(shard).tolist():
            rows = shard == s
            out[rows] = self.shards[s].flat[first[rows, None] + self._cols]
        return out

    def view(self, i: int) -> np.ndarray:
        """Sequence ``i`` as a (block_size,) view on its shard's memory map (no copy; read-only)."""
        shard, first = self._locate(np.array([i]))
        start = int(first[0])
        return self.shards[int(shard[0])].flat[start:start + self.block_size]


def require_boundaries(manifest: dict, what: str, prefix: str = "") -> None:
    """Refuse shards without the doc_starts column (``what``: "the shards in F were" / "set 'en' (F) was")."""
    if "doc_starts" not in (manifest.get("columns") or []):
        raise UserError(f"{prefix}{what} made without --record-boundaries (no doc_starts column), so documents "
                        "cannot be kept apart: re-run `cllama preprocess --record-boundaries`, or set "
                        "data.document_mask: false")


class BoundaryBlocks(TokenBlocks):
    """TokenBlocks of shards made with ``--record-boundaries``, which can also say where each row's documents
    start (the doc_starts column, read in place like the tokens): what ``data.document_mask`` needs."""

    shard_class = MappedBoundaryShard

    def __init__(self, folder: str | Path, manifest: dict, split: str):
        require_boundaries(manifest, f"the shards in {folder} were")
        super().__init__(folder, manifest, split)
        shards: list[MappedBoundaryShard] = self.shards  # type: ignore[assignment]
        cat = lambda name: np.concatenate([getattr(m, name) for m in shards] or [np.zeros(0)]).astype(np.int64)
        self._batch_soff, self._batch_sval = cat("batch_soff"), cat("batch_sval")

    def doc_starts(self, indices: np.ndarray) -> list[np.ndarray]:
        """Per row of ``indices``, the offsets (int64, increasing) where a document starts inside it; a row that
        begins inside a document does not list 0."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        shard, _ = self._locate(idx)
        b = self._batches(idx)
        off = self._batch_soff[b] + (idx - self._batch_first[b])
        base = self._batch_sval[b]
        out: list[np.ndarray] = [np.zeros(0, np.int64)] * len(idx)
        for s in np.unique(shard).tolist():
            rows = np.flatnonzero(shard == s)
            i32 = self.shards[s].i32  # type: ignore[attr-defined]
            lo, hi = i32[off[rows]], i32[off[rows] + 1]
            for r, a, z, v in zip(rows.tolist(), lo.tolist(), hi.tolist(), base[rows].tolist()):
                out[r] = i32[v + a:v + z].astype(np.int64)
        return out


def segments_from_starts(starts: list[np.ndarray], lengths: np.ndarray, block: int) -> np.ndarray:
    """(k, block) int64: 1, 2, ... for the tokens of each row's first, second, ... document or example, 0 past
    ``lengths[r]`` (padding). ``starts[r]``: where row r's documents start; the row's first token always opens
    segment 1 (a row that begins inside a document: that document's tail). A token may attend to another iff both
    are non-zero, equal and the other is not later (model/packing.document_mask)."""
    k = len(starts)
    marks = np.zeros((k, block), dtype=np.int64)
    if k and block:
        rows = np.repeat(np.arange(k), [len(s) for s in starts])
        marks[rows, np.concatenate(starts).astype(np.int64) if len(rows) else rows] = 1
        marks[:, 0] = 1
    seg = np.cumsum(marks, axis=1)
    seg[np.arange(block)[None, :] >= np.asarray(lengths, dtype=np.int64).reshape(-1, 1)] = 0
    return seg


class SFTRows(NamedTuple):
    """Rows of instruction-tuning shards, copied out of the memory maps (numpy; no torch).

    input_ids (k, block) int64; loss_mask (k, block) uint8, 1 where the loss counts (response tokens and their
    EOS); n_tokens (k,) int64, real tokens per row (the rest is padding: no attention, no loss);
    example_starts: k int64 arrays, the offset of each example in its row (the first is 0).
    The labels for a causal LM are ``input_ids`` where ``loss_mask`` is 1 and -100 elsewhere, shifted by the
    model as usual; ``position_ids`` and ``segment_ids`` give what a document-aware attention needs.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    n_tokens: np.ndarray
    example_starts: list[np.ndarray]


class SFTBlocks(TokenBlocks):
    """All rows of one split of instruction-tuning shards (SFT_FORMAT), indexed globally, read in place.

    The same contract as TokenBlocks (memory-mapped, nothing copied at start-up, ``take`` copies only the rows
    asked for, ``len`` is the row count the trainer's GlobalOrder permutes); ``take`` returns all four columns.
    """

    shard_class = MappedSFTShard
    rows_key = "rows"

    def __init__(self, folder: str | Path, manifest: dict, split: str):
        if manifest.get("format") != SFT_FORMAT:
            raise UserError(f"{folder}: format {manifest.get('format')!r} is not instruction-tuning shards "
                            f"({SFT_FORMAT!r})")
        super().__init__(folder, manifest, split)
        self.layout = manifest.get("layout")
        self.pad_id = manifest.get("pad_id")
        shards: list[MappedSFTShard] = self.shards  # type: ignore[assignment]
        cat = lambda name: np.concatenate([getattr(m, name) for m in shards] or [np.zeros(0)]).astype(np.int64)
        self._batch_mask, self._batch_ntok = cat("batch_mask"), cat("batch_ntok")
        self._batch_soff, self._batch_sval = cat("batch_soff"), cat("batch_sval")

    def take(self, indices: np.ndarray) -> SFTRows:  # type: ignore[override]
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        shard, first = self._locate(idx)
        b = self._batches(idx)
        local = idx - self._batch_first[b]  # row inside its record batch
        k, block = len(idx), self.block_size
        ids = np.empty((k, block), dtype=np.int64)
        mask = np.empty((k, block), dtype=np.uint8)
        ntok = np.empty(k, dtype=np.int64)
        starts: list[np.ndarray] = [np.zeros(0, np.int64)] * k
        for s in np.unique(shard).tolist():
            rows = np.flatnonzero(shard == s)
            m: MappedSFTShard = self.shards[s]  # type: ignore[assignment]
            ids[rows] = m.flat[first[rows, None] + self._cols]
            mask[rows] = m.u8[(self._batch_mask[b[rows]] + local[rows] * block)[:, None] + self._cols]
            ntok[rows] = m.i32[self._batch_ntok[b[rows]] + local[rows]]
            off = self._batch_soff[b[rows]] + local[rows]
            lo, hi = m.i32[off], m.i32[off + 1]
            base = self._batch_sval[b[rows]]
            for r, a, z, v in zip(rows.tolist(), lo.tolist(), hi.tolist(), base.tolist()):
                starts[r] = m.i32[v + a:v + z].astype(np.int64)
        return SFTRows(ids, mask, ntok, starts)

    def predicted_tokens(self, indices: np.ndarray) -> int:
        """How many positions of rows ``indices`` a causal LM is scored on: loss-mask ones after each row's first
        token (position 0 has no context). Reads only the mask column, so every rank can count a whole optimizer
        step's loss tokens (all ranks' rows) without a collective; the trainer normalises the loss by it."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if not len(idx):
            return 0
        shard, _ = self._locate(idx)
        b = self._batches(idx)
        local = idx - self._batch_first[b]
        total = 0
        for s in np.unique(shard).tolist():
            rows = np.flatnonzero(shard == s)
            m: MappedSFTShard = self.shards[s]  # type: ignore[assignment]
            start = self._batch_mask[b[rows]] + local[rows] * self.block_size
            total += int(m.u8[start[:, None] + self._cols[1:]].sum(dtype=np.int64))
        return total

    def view(self, i: int) -> SFTRows:  # type: ignore[override]
        """Row ``i`` as views on its shard's memory map (no copy; read-only): arrays of shape (1, block)."""
        idx = np.array([i], dtype=np.int64)
        shard, first = self._locate(idx)
        b = int(self._batches(idx)[0])
        local = i - int(self._batch_first[b])
        m: MappedSFTShard = self.shards[int(shard[0])]  # type: ignore[assignment]
        start, block = int(first[0]), self.block_size
        mpos = int(self._batch_mask[b]) + local * block
        npos = int(self._batch_ntok[b]) + local
        off = int(self._batch_soff[b]) + local
        v = int(self._batch_sval[b])
        return SFTRows(m.flat[start:start + block][None], m.u8[mpos:mpos + block][None], m.i32[npos:npos + 1],
                       [m.i32[v + int(m.i32[off]):v + int(m.i32[off + 1])]])


def position_ids(rows: SFTRows) -> np.ndarray:
    """(k, block) int64 positions restarting at 0 at every example start, and again for the padding tail:
    what a packed row needs so that each example sees the positions it would alone (pack.Block.position_ids)."""
    k, block = rows.input_ids.shape
    pos = np.broadcast_to(np.arange(block, dtype=np.int64), (k, block)).copy()
    for r in range(k):
        bounds = np.append(rows.example_starts[r], rows.n_tokens[r])
        for a, z in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            pos[r, a:z] -= a
        pos[r, rows.n_tokens[r]:] -= int(rows.n_tokens[r])
    return pos


def segment_ids(rows: SFTRows) -> np.ndarray:
    """(k, block) int64: 1, 2, ... for the tokens of a row's first, second, ... example, 0 on padding. A token
    may attend to another iff both are non-zero, equal and the other is not later (document-aware causal mask)."""
    return segments_from_starts(rows.example_starts, rows.n_tokens, rows.input_ids.shape[1])


def text_sizes(folder: str | Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(characters, UTF-8 bytes) of the text each sequence of ``split`` came from, in TokenBlocks' order: the
    n_chars / n_bytes columns (format cllama-shards/2), or None for shards that lack them (format /1)."""
    if not {"n_chars", "n_bytes"} <= set(manifest.get("columns") or []):
        return None
    import pyarrow as pa

    chars, nbytes = [], []
    for s in manifest["splits"].get(split, {"shards": []})["shards"]:
        with pa.memory_map(str(Path(folder) / s["file"]), "r") as f:
            table = pa.ipc.open_stream(f).read_all().select(["n_chars", "n_bytes"])
            chars.append(table.column("n_chars").to_numpy().astype(np.int64))
            nbytes.append(table.column("n_bytes").to_numpy().astype(np.int64))
    if not chars:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(chars), np.concatenate(nbytes)


def _room_for_open_files(n: int) -> None:
    """Raise the soft limit on open files when the shards would come near it: a memory map keeps its file
    open, one per shard (a 100 GB corpus at 256 MB per shard is about 800 train and validation shards, and
    the soft limit is often 1,024)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = n * 2 + 256  # both splits open at once, plus everything else the process has open
        if soft != resource.RLIM_INFINITY and soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))
    except (ImportError, ValueError, OSError):
        pass  # the open will say "too many open files" itself


class GlobalOrder:
    """Sample position -> sequence index: a fresh seeded permutation every epoch.

    ``stream`` keys a separate order for one set of a mixture (``MixedOrder``); the single-folder run keeps
    the key ``[seed, epoch]`` it always had, so its order (and resuming its checkpoints) is unchanged.
    """

    def __init__(self, n: int, seed: int, stream: tuple[int, ...] = (), what: str = "the train split"):
        if n == 0:
            raise UserError(f"{what} has no sequences: nothing to train on")
        self.n, self.seed, self.stream = n, seed, tuple(stream)
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s order: ``default_rng([seed, epoch]).permutation(n)``, held as int32 (the same shuffle of
        the same draws, so the same order, in half the memory: 4 bytes per sequence on every rank, the one part of
        the data path that grows with the corpus), one epoch at a time."""
        if epoch not in self._cache:
            self._cache.clear()  # the previous epoch's order goes before the next is made, not after
            perm = np.arange(self.n, dtype=np.int32 if self.n < 2**31 else np.int64)
            np.random.default_rng([self.seed, *self.stream, epoch]).shuffle(perm)
            self._cache[epoch] = perm
        return self._cache[epoch]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.n)
        return np.array([self._perm(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)


MIX_KEY = 0x6D6978  # "mix": keys the set draws apart from every other use of the seed
MIX_CHUNK = 8192  # positions whose set draws are made (and counted) together


class MixedOrder:
    """Sample position -> (set, sequence of that set) for a weighted mixture of shard sets, from the seed alone.

    Position p draws its set from ``default_rng([seed, MIX_KEY, p // MIX_CHUNK])`` (one uniform per position of
    the chunk, against the cumulative weights), so the mixture depends on nothing but the seed, the weights and
    the position: a resume at any position, on any number of processes, continues it exactly. Within set s,
    the k-th draw of s reads position k of that set's own ``GlobalOrder`` (keyed by the set's name), so each set
    is walked epoch by epoch, re-permuted every epoch, and no sequence repeats within an epoch of its set.
    Finding k for a position counts the draws of the chunks before it: computed once per chunk and kept (one row
    of counts per 8,192 positions; a resume at sample 10M draws ~1,200 chunks, well under a second).
    """

    def __init__(self, sizes: list[int], weights: list[float], names: list[str], seed: int):
        import zlib

        if not sizes:
            raise UserError("no shard sets to train on")
        w = np.asarray(weights, dtype=np.float64)
        self.names, self.sizes, self.seed = list(names), [int(n) for n in sizes], seed
        self.weights = w / w.sum()
        self._cum = np.cumsum(self.weights)
        self._cum[-1] = 1.0  # rounding must never leave a draw past the last set
        self.orders = [GlobalOrder(n, seed, (MIX_KEY, zlib.crc32(name.encode())), f"the train split of set {name!r}")
                       for n, name in zip(self.sizes, self.names)]
        self._counts = [np.zeros(len(sizes), dtype=np.int64)]  # draws of each set before chunk c
        self._chunk: tuple[int, np.ndarray, np.ndarray] | None = None

    def _draws(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk c's set of each position, and each position's rank among the chunk's draws of its set."""
        if self._chunk is None or self._chunk[0] != c:
            u = np.random.default_rng([self.seed, MIX_KEY, c]).random(MIX_CHUNK)
            sets = np.searchsorted(self._cum, u, side="right").astype(np.int64)
            rank = np.empty(MIX_CHUNK, np.int64)
            for k in range(len(self.sizes)):
                here = sets == k
                rank[here] = np.arange(int(here.sum()))
            self._chunk = (c, sets, rank)
        return self._chunk[1], self._chunk[2]

    def _before(self, c: int) -> np.ndarray:
        while len(self._counts) <= c:
            k = len(self._counts) - 1
            self._counts.append(self._counts[k] + np.bincount(self._draws(k)[0], minlength=len(self.sizes)))
        return self._counts[c]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(set, k): the set of each position and how many earlier positions drew that set."""
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(pos) and pos.min() < 0:
            raise IndexError(f"sample position {pos.min()} is negative")
        sets, ks = np.empty(len(pos), np.int64), np.empty(len(pos), np.int64)
        for c in np.unique(pos // MIX_CHUNK).tolist():
            here = np.flatnonzero(pos // MIX_CHUNK == c)
            before = self._before(c)
            draws, rank = self._draws(c)
            off = pos[here] - c * MIX_CHUNK
            sets[here] = draws[off]
            ks[here] = before[draws[off]] + rank[off]
        return sets, ks

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Global row indices over the sets one after another (set s's rows follow those of the sets before it:
        trainer/mixture.MixedData)."""
        sets, ks = self.locate(positions)
        out = np.empty(len(sets), np.int64)
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        for s in np.unique(sets).tolist():
            here = sets == s
            out[here] = offsets[s] + self.orders[s].indices(ks[here])
        return out

    def consumed(self, samples: int) -> dict[str, int]:
        """Sequences of each set among the first ``samples`` positions."""
        c, off = divmod(int(samples), MIX_CHUNK)
        counts = self._before(c) + np.bincount(self._draws(c)[0][:off], minlength=len(self.sizes))
        return {name: int(n) for name, n in zip(self.names, counts)}

    def epochs(self, samples: int) -> dict[str, float]:
        """Epochs of each set seen by the first ``samples`` positions (1.5: one full pass and half the next)."""
        return {name: n / size for (name, n), size in zip(self.consumed(samples).items(), self.sizes)}


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
