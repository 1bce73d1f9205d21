"""Shard readers: ``MappedShard`` and its two kinds (zero-copy views on a read-only memory map, what the loaders are
made of), ``read_shard`` (an Arrow table) and ``shard_tokens`` (one array, a copy, for tools)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from ...errors import UserError
from .format import arrow_failure, check_schema, check_sft_schema


def read_shard(path: str | os.PathLike) -> pa.Table:
    """Memory-mapped, zero-copy read of one shard."""
    return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()


class MappedShard:
    """One shard's ``input_ids`` as zero-copy views on a read-only memory map of the file.

    Nothing is copied: the rows are read from the page cache when they are touched, so a process's memory does
    not grow with the number or size of the shards it opens (the mapped pages it has touched count in its RSS as
    file pages, shared with every other process on the node, and the kernel may drop them at any time).

    A shard is an Arrow IPC stream of record batches, each a message (header + body) of its own, so the rows
    are not one contiguous array: each batch's values lie at their own offset in the file. Those offsets are
    found by reading message headers only. The writer's batches all have the same size but the last
    (ROWS_PER_BATCH rows, no nulls, no variable-length column), so their messages have the same length: with the
    manifest's row count the offsets follow from the first batch, and the middle and last batches and the end of
    stream are read to confirm it; a shard laid out otherwise (doc_starts column, another writer) has every
    header read. Either way only a few pages of the file are touched per batch at most, never the rows.
    """

    def __init__(self, path: str | os.PathLike, block_size: int | None = None, dtype: np.dtype | str | None = None,
                 rows: int | None = None, columns: list[str] | None = None):
        self.path = Path(path)
        try:
            self._map = pa.memory_map(str(self.path), "r")
        except FileNotFoundError:
            raise UserError(f"shard {self.path} named in the manifest is missing") from None
        except Exception as exc:
            raise arrow_failure(self.path, exc) from None
        self.size = self._map.size()
        if self.size == 0:
            raise UserError(f"shard {self.path} is empty (0 bytes): corrupt or cut short; re-run `cllama preprocess`")
        self._whole = self._map.read_buffer(self.size)  # zero-copy: the whole mapping, for base address and views
        try:
            self._schema_end = self._read_schema()
            self.block_size, self.dtype = self._check_schema(block_size, dtype, columns)
            offsets, counts = self._layout(rows)
        except UserError:
            raise
        except Exception as exc:
            raise arrow_failure(self.path, exc) from None
        itemsize = self.dtype.itemsize
        if np.any(offsets % itemsize):
            raise UserError(f"shard {self.path}: token ids not aligned to {itemsize} bytes: not written by cllama")
        self.batch_rows = counts.astype(np.int64)
        self.batch_elem = (offsets // itemsize).astype(np.int64)  # element offset of each batch's first token
        self.rows = int(self.batch_rows.sum())
        # The whole file as one array of token-sized elements: a batch's rows are a slice of it.
        self.flat = np.frombuffer(self._whole, dtype=self.dtype, count=self.size // itemsize)

    def _check_schema(self, block_size, dtype, columns) -> tuple[int, np.dtype]:
        return check_schema(self.path, self.schema, block_size, dtype, columns)

    # -- reading headers

    def _message_at(self, pos: int):
        """(message, end position) of the IPC message starting at byte ``pos``, None at end of stream."""
        self._map.seek(pos)
        try:
            msg = pa.ipc.read_message(self._map)
        except (StopIteration, EOFError):
            return None, self._map.tell()
        return msg, self._map.tell()

    def _read_schema(self) -> int:
        msg, end = self._message_at(0)
        if msg is None or msg.type != "schema":
            raise UserError(f"shard {self.path} does not start with an Arrow schema: not an Arrow stream file")
        self.schema = pa.ipc.read_schema(msg)
        return end

    def _batch_at(self, pos: int):
        """(rows, absolute offset of its input_ids values, end) of the record batch message at ``pos``."""
        msg, end = self._message_at(pos)
        if msg is None:
            return None
        if msg.type != "record batch":
            raise UserError(f"shard {self.path}: unexpected Arrow message {msg.type!r} at byte {pos}")
        batch = pa.ipc.read_record_batch(msg, self.schema)
        col = batch.column(0)
        values = col.values
        if col.null_count or col.offset or values.offset or values.null_count:
            raise UserError(f"shard {self.path}: input_ids of the batch at byte {pos} has nulls or offsets: "
                            "not written by cllama")
        buf = values.buffers()[1]
        need = batch.num_rows * self.block_size * self.dtype.itemsize
        if buf is None and need:
            raise UserError(f"shard {self.path}: the batch at byte {pos} has no token buffer")
        if need and buf.size < need:
            raise UserError(f"shard {self.path}: the batch at byte {pos} holds {buf.size} bytes of tokens, "
                            f"{batch.num_rows} rows need {need}")
        addr = buf.address - self._whole.address if buf is not None else 0
        if need and not 0 <= addr <= self.size - need:
            raise UserError(f"shard {self.path}: the batch at byte {pos} points outside the file")
        return batch.num_rows, addr, end

    def _end_of_stream(self, pos: int) -> bool:
        return pos == self.size - 8 and self._whole[pos:pos + 8].to_pybytes() == b"\xff\xff\xff\xff\0\0\0\0" \
            or pos == self.size - 4 and self._whole[pos:pos + 4].to_pybytes() == b"\0\0\0\0"

    def _layout(self, rows: int | None) -> tuple[np.ndarray, np.ndarray]:
        first = self._batch_at(self._schema_end)
        if first is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        predicted = self._predict(first, rows) if rows else None
        return predicted if predicted is not None else self._scan()

    def _predict(self, first: tuple[int, int, int], rows: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The layout from the first batch and the row count, confirmed at the middle and last batches."""
        per, addr0, end0 = first
        if per <= 0:
            return None
        n = -(-rows // per)
        stride = end0 - self._schema_end
        counts = np.full(n, per, dtype=np.int64)
        counts[-1] = rows - (n - 1) * per
        starts = self._schema_end + stride * np.arange(n, dtype=np.int64)
        offsets = starts + (addr0 - self._schema_end)
        end = end0
        for k in sorted({n // 2, n - 1} - {0}):
            try:
                got = self._batch_at(int(starts[k]))
            except Exception:  # noqa: BLE001  (not where predicted: read every header instead)
                return None
            if got is None or got[0] != counts[k] or got[1] != offsets[k]:
                return None
            end = got[2]
        if not self._end_of_stream(end):
            return None
        return offsets, counts

    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        offsets, counts = [], []
        pos = self._schema_end
        while True:
            if pos >= self.size:
                raise UserError(f"shard {self.path} ends without the Arrow end-of-stream marker: cut short "
                                "(a copy or a write that did not finish?)")
            if self._end_of_stream(pos):
                break
            got = self._batch_at(pos)
            if got is None:
                break
            counts.append(got[0])
            offsets.append(got[1])
            pos = got[2]
        return np.asarray(offsets, np.int64), np.asarray(counts, np.int64)

    # -- the rows

    def batches(self) -> list[np.ndarray]:
        """Each record batch's rows as an (n, block_size) view on the map (no copy)."""
        b = self.block_size
        return [self.flat[e:e + r * b].reshape(r, b) for e, r in zip(self.batch_elem.tolist(), self.batch_rows.tolist())]

    def close(self) -> None:
        self.flat = None  # type: ignore[assignment]
        self._whole = None
        self._map.close()


class MappedBoundaryShard(MappedShard):
    """A pre-training shard made with ``--record-boundaries``: ``input_ids`` and its ``doc_starts`` column as
    zero-copy views on the memory map (what a run with ``data.document_mask`` reads).

    doc_starts has a variable length, so record batches differ in size and every header is read (as for
    instruction-tuning shards); per batch it keeps the int32 index of the column's offsets and of its values
    inside the file, and ``i32`` views the whole file as int32 (Arrow aligns every buffer to 8 bytes).
    """

    def _layout(self, rows: int | None) -> tuple[np.ndarray, np.ndarray]:
        if "doc_starts" not in self.schema.names:
            raise UserError(f"shard {self.path} has no doc_starts column: made without --record-boundaries")
        self._col = self.schema.names.index("doc_starts")
        self._starts_at: list[tuple[int, int]] = []
        offsets, counts = self._scan()  # _batch_at (below) records each batch's doc_starts buffers
        ex = np.asarray(self._starts_at, np.int64).reshape(-1, 2)
        if np.any(ex % 4):
            raise UserError(f"shard {self.path}: doc_starts not aligned to 4 bytes: not written by cllama")
        self.batch_soff = ex[:, 0] // 4  # int32 index of each batch's doc_starts offsets (rows + 1 of them)
        self.batch_sval = ex[:, 1] // 4  # int32 index of its doc_starts values
        self.i32 = np.frombuffer(self._whole, dtype=np.int32, count=self.size // 4)
        return offsets, counts

    def _batch_at(self, pos: int):
        got = super()._batch_at(pos)
        if got is None:
            return None
        msg, _ = self._message_at(pos)  # headers only: the batch's buffers stay in the map
        starts = pa.ipc.read_record_batch(msg, self.schema).column(self._col)
        if starts.null_count or starts.offset or starts.values.offset:
            raise UserError(f"shard {self.path}: doc_starts of the batch at byte {pos} has nulls or offsets: "
                            "not written by cllama")
        n = got[0]
        self._starts_at.append((buffer_at(self, starts.buffers()[1], (n + 1) * 4, pos),
                                buffer_at(self, starts.values.buffers()[1], len(starts.values) * 4, pos)))
        return got

    def close(self) -> None:
        self.i32 = None  # type: ignore[assignment]
        super().close()


def buffer_at(shard: MappedShard, buf, need: int, pos: int) -> int:
    """The byte offset in ``shard``'s file of ``buf``, which must hold ``need`` bytes (0: nothing to check)."""
    if need == 0:
        return 0
    if buf is None or buf.size < need:
        raise UserError(f"shard {shard.path}: the batch at byte {pos} holds {0 if buf is None else buf.size} bytes "
                        f"where its rows need {need}: corrupt")
    addr = buf.address - shard._whole.address
    if not 0 <= addr <= shard.size - need:
        raise UserError(f"shard {shard.path}: the batch at byte {pos} points outside the file")
    return addr


def shard_tokens(path: str | os.PathLike) -> np.ndarray:
    """The shard's ``input_ids`` as ONE (n, block_size) array: a COPY of every row when the shard has more than
    one record batch (every shard of over 1,024 sequences), a view on the memory map otherwise.

    For tests and tools that want one array; the trainer and eval use ``loader.TokenBlocks``, which copies
    nothing.
    """
    shard = MappedShard(path)
    parts = shard.batches()
    if not parts:
        return np.zeros((0, shard.block_size), dtype=shard.dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class MappedSFTShard(MappedShard):
    """An instruction-tuning shard's four columns as zero-copy views on a read-only memory map.

    As MappedShard, with every record batch's header read (example_starts has a variable length, so batches
    differ in size): per batch, the offsets of its loss_mask bytes, n_tokens values and example_starts offsets
    and values inside the file. ``u8`` and ``i32`` view the whole file as bytes and as int32 (Arrow aligns every
    buffer to 8 bytes, so each column is a slice of one of them).
    """

    def _check_schema(self, block_size, dtype, columns) -> tuple[int, np.dtype]:
        return check_sft_schema(self.path, self.schema, block_size, dtype, columns)

    def _layout(self, rows: int | None) -> tuple[np.ndarray, np.ndarray]:
        offsets, counts, extra = [], [], []
        pos = self._schema_end
        while True:
            if pos >= self.size:
                raise UserError(f"shard {self.path} ends without the Arrow end-of-stream marker: cut short "
                                "(a copy or a write that did not finish?)")
            if self._end_of_stream(pos):
                break
            msg, end = self._message_at(pos)
            if msg is None:
                break
            if msg.type != "record batch":
                raise UserError(f"shard {self.path}: unexpected Arrow message {msg.type!r} at byte {pos}")
            batch = pa.ipc.read_record_batch(msg, self.schema)
            n = batch.num_rows
            b = self.block_size
            ids, mask, starts, ntok = (batch.column(k) for k in range(4))
            if any(c.null_count or c.offset for c in (ids, mask, starts, ntok)) or ids.values.offset \
                    or mask.values.offset or starts.values.offset:
                raise UserError(f"shard {self.path}: a column of the batch at byte {pos} has nulls or offsets: "
                                "not written by cllama")
            addr = [self._addr(ids.values.buffers()[1], n * b * self.dtype.itemsize, pos),
                    self._addr(mask.values.buffers()[1], n * b, pos),
                    self._addr(ntok.buffers()[1], n * 4, pos),
                    self._addr(starts.buffers()[1], (n + 1) * 4, pos),
                    self._addr(starts.values.buffers()[1], len(starts.values) * 4, pos)]
            if any(a % 4 for a in addr[2:]):
                raise UserError(f"shard {self.path}: int32 columns not aligned to 4 bytes: not written by cllama")
            counts.append(n)
            offsets.append(addr[0])
            extra.append(addr[1:])
            pos = end
        ex = np.asarray(extra, np.int64).reshape(-1, 4)
        self.batch_mask = ex[:, 0]           # byte offset of each batch's first loss_mask value
        self.batch_ntok = ex[:, 1] // 4      # int32 index of its first n_tokens value
        self.batch_soff = ex[:, 2] // 4      # int32 index of its example_starts offsets
        self.batch_sval = ex[:, 3] // 4      # int32 index of its example_starts values
        self.u8 = np.frombuffer(self._whole, dtype=np.uint8)
        self.i32 = np.frombuffer(self._whole, dtype=np.int32, count=self.size // 4)
        return np.asarray(offsets, np.int64), np.asarray(counts, np.int64)

    def _addr(self, buf, need: int, pos: int) -> int:
        return buffer_at(self, buf, need, pos)

    def close(self) -> None:
        self.u8 = self.i32 = None  # type: ignore[assignment]
        super().close()
