"""Shard writers: Arrow IPC stream files written under a temporary name, synced, hashed, renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from ... import files
from .format import ROWS_PER_BATCH, schema, sft_schema, sha256_file


class StreamWriter:
    """An Arrow IPC stream written to ``path + '.tmp'``; ``_finish()`` renames it into place.

    The record (size, sha256) is taken from the finished temporary file, after it reached the disk (fsync), and
    before the rename: a shard under its final name is always complete, and its record describes the bytes this
    writer wrote. An OS error (a full disk) is raised as a one-line UserError naming the file.
    """

    def __init__(self, path: Path, sch: pa.Schema):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.schema = sch
        try:
            self._sink = pa.OSFile(str(self.tmp), "wb")
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
        except OSError as exc:
            raise files.os_error(exc, self.tmp) from None

    def _write(self, cols: list) -> None:
        try:
            self._writer.write_batch(pa.record_batch(cols, schema=self.schema))
        except OSError as exc:
            raise files.os_error(exc, self.tmp) from None

    def _finish(self) -> tuple[int, str]:
        """(bytes, sha256) of the finished file, now under its final name."""
        try:
            self._writer.close()
            self._sink.close()
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
                size = os.fstat(f.fileno()).st_size
            digest = sha256_file(self.tmp)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise files.os_error(exc, self.tmp) from None
        return size, digest

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        except Exception:  # noqa: BLE001  (a full disk fails the close too, or it was closed: the file goes either way)
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


class ShardWriter(StreamWriter):
    """Writes pre-training sequences to ``path + '.tmp'``; ``close()`` renames it into place and returns its
    record (see StreamWriter)."""

    def __init__(self, path: Path, block_size: int, dtype: np.dtype, boundaries: bool, sizes: bool = False):
        """``sizes``: write n_chars / n_bytes, the characters and UTF-8 bytes of the text of each sequence."""
        self.block, self.dtype, self.boundaries, self.sizes = block_size, dtype, boundaries, sizes
        super().__init__(path, schema(block_size, dtype, boundaries, sizes))
        self._rows: list[np.ndarray] = []
        self._starts: list[list[int]] = []
        self._sizes: list[np.ndarray] = []
        self.characters = self.utf8_bytes = 0
        self._pending = 0
        self.sequences = 0

    def add(self, blocks: np.ndarray, starts: list[list[int]] | None = None, sizes: np.ndarray | None = None) -> None:
        """Append sequences: ``blocks`` is (n, block_size); ``sizes`` (n, 2) their characters and UTF-8 bytes."""
        if len(blocks) == 0:
            return
        self._rows.append(blocks)
        if self.boundaries:
            self._starts.extend(starts or [])
        if self.sizes:
            if sizes is None or len(sizes) != len(blocks):
                raise ValueError("a writer with sizes needs (n, 2) character and byte counts per sequence")
            self._sizes.append(np.asarray(sizes, dtype=np.int64))
            self.characters += int(sizes[:, 0].sum())
            self.utf8_bytes += int(sizes[:, 1].sum())
        self._pending += len(blocks)
        self.sequences += len(blocks)
        while self._pending >= ROWS_PER_BATCH:
            self._flush(ROWS_PER_BATCH)

    def _flush(self, n: int) -> None:
        rows = np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]
        head, rest = rows[:n], rows[n:]
        self._rows = [rest] if len(rest) else []
        self._pending = len(rest)
        values = pa.array(np.ascontiguousarray(head).reshape(-1))
        cols = [pa.FixedSizeListArray.from_arrays(values, self.block)]
        if self.boundaries:
            cols.append(pa.array(self._starts[:n], type=pa.list_(pa.int32())))
            self._starts = self._starts[n:]
        if self.sizes:
            sz = np.concatenate(self._sizes) if len(self._sizes) > 1 else self._sizes[0]
            cols += [pa.array(np.ascontiguousarray(sz[:n, 0])), pa.array(np.ascontiguousarray(sz[:n, 1]))]
            self._sizes = [sz[n:]] if len(sz) > n else []
        self._write(cols)

    def close(self) -> dict:
        try:
            if self._pending:
                self._flush(self._pending)
        except OSError as exc:
            raise files.os_error(exc, self.tmp) from None
        size, digest = self._finish()
        record = {"file": self.path.name, "sequences": self.sequences, "tokens": self.sequences * self.block,
                  "bytes": size, "sha256": digest}
        if self.sizes:  # the exact totals of the text the shard's tokens came from
            record.update(characters=self.characters, utf8_bytes=self.utf8_bytes)
        return record


class SFTShardWriter(StreamWriter):
    """Writes instruction-tuning rows (SFT_FORMAT) to ``path + '.tmp'``; ``close()`` renames it into place and
    returns its record: file, rows, examples, tokens (real, not padding), response_tokens, bytes, sha256."""

    def __init__(self, path: Path, block_size: int, dtype: np.dtype):
        self.block, self.dtype = block_size, np.dtype(dtype)
        super().__init__(path, sft_schema(block_size, self.dtype))
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending = 0
        self.rows = self.examples = self.tokens = self.response_tokens = 0

    def add(self, input_ids: np.ndarray, loss_mask: np.ndarray, n_tokens: np.ndarray, starts: np.ndarray,
            starts_per_row: np.ndarray) -> None:
        """Append rows: ``input_ids`` and ``loss_mask`` are (n, block_size); ``n_tokens`` (n,); the rows'
        example_starts are ``starts`` (flat, in row order) cut by ``starts_per_row`` (n,)."""
        n = len(input_ids)
        if n == 0:
            return
        part = (np.asarray(input_ids, self.dtype).reshape(n, self.block),
                np.asarray(loss_mask, np.uint8).reshape(n, self.block),
                np.asarray(n_tokens, np.int32), np.asarray(starts, np.int32), np.asarray(starts_per_row, np.int64))
        self._parts.append(part)
        self._pending += n
        self.rows += n
        self.examples += int(part[4].sum())
        self.tokens += int(part[2].sum())
        self.response_tokens += int(part[1].sum(dtype=np.int64))
        while self._pending >= ROWS_PER_BATCH:
            self._flush(ROWS_PER_BATCH)

    def _flush(self, n: int) -> None:
        if len(self._parts) > 1:
            self._parts = [tuple(np.concatenate([p[k] for p in self._parts]) for k in range(5))]  # type: ignore[misc]
        ids, mask, ntok, starts, per_row = self._parts[0]
        k = int(per_row[:n].sum())
        rest = (ids[n:], mask[n:], ntok[n:], starts[k:], per_row[n:])
        self._parts = [rest] if len(rest[0]) else []
        self._pending = len(rest[0])
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(per_row[:n], out=offsets[1:])
        cols = [pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(ids[:n]).reshape(-1)), self.block),
                pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(mask[:n]).reshape(-1)), self.block),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(starts[:k]))),
                pa.array(np.ascontiguousarray(ntok[:n]))]
        self._write(cols)

    def close(self) -> dict:
        try:
            if self._pending:
                self._flush(self._pending)
        except OSError as exc:
            raise files.os_error(exc, self.tmp) from None
        size, digest = self._finish()
        return {"file": self.path.name, "rows": self.rows, "examples": self.examples, "tokens": self.tokens,
                "response_tokens": self.response_tokens, "bytes": size, "sha256": digest}
