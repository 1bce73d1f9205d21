"""Arrow shards and the manifest: the contract between the preprocessor and the trainer.

A shard is an Arrow IPC *stream* file (what ``datasets`` itself writes) with one row per training
sequence: ``input_ids``, a fixed-size list of exactly ``block_size`` token ids in the smallest unsigned
type that holds the vocabulary (uint16 up to 65,536 pieces), and optionally ``doc_starts``, the
offsets inside the sequence where a document begins. Read one with

    datasets.Dataset.from_file("out/train-00000.arrow")
    datasets.load_dataset("arrow", data_files={"train": "out/train-*.arrow"}, split="train")
    pyarrow.ipc.open_stream(pyarrow.memory_map("out/train-00000.arrow")).read_all()   # zero-copy

``manifest.json`` names the tokenizer fingerprint, block size, dtype, BOS/EOS policy and, per shard,
its file, sequences, tokens and sha256. The trainer calls ``check_manifest`` before building anything.

Readers: ``MappedShard`` (zero-copy views on a memory map, what ``loader.TokenBlocks`` is made of) and
``shard_tokens`` (one array, a copy, for tools). ``verify_shards`` checks shards against the manifest, in full
or by subsets that ranks can share (docs/hazards.md#h16).

Instruction-tuning shards (``cllama preprocess-sft``, format SFT_FORMAT) are the second kind: the same stream
files with four columns (input_ids, loss_mask, example_starts, n_tokens; see the section at the end), their own
manifest format (``load_sft_manifest``, ``check_sft_manifest``), read by ``MappedSFTShard`` /
``loader.SFTBlocks`` and verified by the same ``verify_shards``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from .. import files
from ..errors import UserError

MANIFEST = "manifest.json"
# /2 added the n_chars / n_bytes columns (the text each sequence came from: bits per character); /1 shards still
# train and evaluate, without bits per character.
FORMAT = "cllama-shards/2"
FORMAT_V1 = "cllama-shards/1"
PRETRAIN_FORMATS = (FORMAT, FORMAT_V1)
SIZE_COLUMNS = ["n_chars", "n_bytes"]
SFT_FORMAT = "cllama-sft-shards/1"  # instruction tuning: see "Instruction-tuning shards" below
SFT_COLUMNS = ["input_ids", "loss_mask", "example_starts", "n_tokens"]
ROWS_PER_BATCH = 1024  # fixed, so that files are byte-identical however the stream arrived


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def schema(block_size: int, dtype: np.dtype, boundaries: bool, sizes: bool = False) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(pa.from_numpy_dtype(dtype), block_size), nullable=False)]
    if boundaries:
        fields.append(pa.field("doc_starts", pa.list_(pa.int32()), nullable=False))
    if sizes:  # fixed width, so every full record batch keeps one message length (MappedShard._predict)
        fields += [pa.field(name, pa.int64(), nullable=False) for name in SIZE_COLUMNS]
    return pa.schema(fields)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class _StreamWriter:
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


class ShardWriter(_StreamWriter):
    """Writes pre-training sequences to ``path + '.tmp'``; ``close()`` renames it into place and returns its
    record (see _StreamWriter)."""

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


def read_shard(path: str | os.PathLike) -> pa.Table:
    """Memory-mapped, zero-copy read of one shard."""
    return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()


def check_schema(path: str | os.PathLike, sch: pa.Schema, block_size: int | None = None,
                 dtype: np.dtype | str | None = None, columns: list[str] | None = None) -> tuple[int, np.dtype]:
    """Refuse a shard whose Arrow schema is not what the manifest says; returns (block size, dtype) it holds.

    Checked here, by name, so that a manifest that does not belong to its shards (copied from another run, a
    hand edit) is an error naming the shard instead of a numpy broadcast error deep in the loader.
    """
    if "input_ids" not in sch.names:
        raise UserError(f"shard {path} has no input_ids column (columns: {', '.join(sch.names)}): not a cllama shard")
    t = sch.field("input_ids").type
    if not pa.types.is_fixed_size_list(t):
        raise UserError(f"shard {path}: input_ids is {t}, not a fixed-size list of token ids: not a cllama shard")
    held_dtype = np.dtype(t.value_type.to_pandas_dtype())
    problems = []
    if block_size is not None and t.list_size != int(block_size):
        problems.append(f"its sequences hold {t.list_size} tokens, the manifest's block_size is {block_size}")
    if dtype is not None and held_dtype != np.dtype(dtype):
        problems.append(f"its token ids are {held_dtype.name}, the manifest's dtype is {np.dtype(dtype).name}")
    if columns is not None and list(sch.names) != list(columns):
        problems.append(f"its columns are {list(sch.names)}, the manifest's are {list(columns)}")
    if problems:
        raise UserError(f"shard {path}: " + "; ".join(problems)
                        + " (the manifest does not describe this shard: re-run `cllama preprocess`)")
    return t.list_size, held_dtype


def _arrow_failure(path: str | os.PathLike, exc: Exception) -> UserError:
    if isinstance(exc, OSError) and exc.errno is not None:
        return files.os_error(exc, path, "read")
    return UserError(f"shard {path} is not a readable Arrow stream, it is corrupt or truncated ({exc})")


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
            raise _arrow_failure(self.path, exc) from None
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
            raise _arrow_failure(self.path, exc) from None
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
        self._starts_at.append((_buffer_at(self, starts.buffers()[1], (n + 1) * 4, pos),
                                _buffer_at(self, starts.values.buffers()[1], len(starts.values) * 4, pos)))
        return got

    def close(self) -> None:
        self.i32 = None  # type: ignore[assignment]
        super().close()


def _buffer_at(shard: MappedShard, buf, need: int, pos: int) -> int:
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


def load_manifest(folder: str | os.PathLike, formats: tuple[str, ...] = PRETRAIN_FORMATS) -> dict:
    """The folder's manifest.json, refused unless its format is one of ``formats`` (default: pre-training
    shards; ``load_sft_manifest`` reads instruction-tuning shards)."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        raise UserError(
            f"{folder} has no {MANIFEST}: not a finished preprocessing output (run `cllama preprocess`, "
            "or `cllama preprocess finalize` after an array of tasks)"
        )
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p} is corrupt (not valid JSON: {exc})") from None
    if m.get("format") not in formats:
        what = {FORMAT: "pre-training shards (`cllama preprocess`)", FORMAT_V1: "pre-training shards (`cllama preprocess`)",
                SFT_FORMAT: "instruction-tuning shards (`cllama preprocess-sft`)"}
        known = what.get(m.get("format"))
        if known:
            raise UserError(f"{p}: these are {known}, format {m.get('format')!r}; expected "
                            f"{' or '.join(what.get(f, repr(f)) for f in formats)}")
        raise UserError(f"{p}: unknown shard format {m.get('format')!r}, expected {' or '.join(map(repr, formats))}")
    return m


def check_manifest(manifest: dict, fingerprint: dict, block_size: int, where: str = "shards") -> None:
    """Refuse shards made with another tokenizer or block size, naming both values."""
    theirs = manifest["tokenizer"]
    problems = []
    if theirs["vocab_size"] != fingerprint["vocab_size"]:
        problems.append(f"vocab size: shards {theirs['vocab_size']:,}, tokenizer {fingerprint['vocab_size']:,}")
    from ..tokenizer.spm import same_tokenizer

    if not same_tokenizer(theirs["sha256"], fingerprint):
        problems.append(f"tokenizer sha256: shards {theirs['sha256'][:16]}..., tokenizer {fingerprint['sha256'][:16]}...")
    for key in ("bos_id", "eos_id", "unk_id"):
        if theirs.get(key) != fingerprint.get(key):
            problems.append(f"{key}: shards {theirs.get(key)}, tokenizer {fingerprint.get(key)}")
    if manifest["block_size"] != block_size:
        problems.append(f"block size: shards {manifest['block_size']}, config {block_size}")
    if problems:
        raise UserError(f"{where} do not match this run: " + "; ".join(problems)
                        + " (re-run `cllama preprocess` with this tokenizer and block size)")


# ------------------------------------------------------------------------------ verification


class _HashingReader(io.RawIOBase):
    """A file read once, sequentially, hashing every byte on its way to the reader."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n:
            self.h.update(memoryview(b)[:n])
            self.n += n
        return n

    def tell(self) -> int:
        return self.n

    def drain(self) -> None:
        buf = bytearray(1 << 22)
        while self.readinto(buf):
            pass


def shard_list(manifest: dict) -> list[dict]:
    """Every shard the manifest names, train then validation, each with its split under "split"."""
    return [{**shard, "split": split} for split, info in manifest["splits"].items() for shard in info["shards"]]


def shard_subsets(manifest: dict, world: int) -> list[list[str]]:
    """The shards cut into ``world`` subsets of about equal bytes (largest first onto the lightest subset):
    the same cut on every rank, so that ranks can share the verification."""
    subsets: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for shard in sorted(shard_list(manifest), key=lambda x: (-int(x["bytes"]), x["file"])):
        k = min(range(world), key=lambda i: (load[i], i))
        subsets[k].append(shard["file"])
        load[k] += int(shard["bytes"])
    return subsets


RECORD_FORMAT = "cllama-verified-shards/1"


def _read_record(path: Path, folder: Path, vocab: int) -> dict:
    try:
        r = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged record only costs a re-check
    if r.get("format") != RECORD_FORMAT or r.get("folder") != str(folder.resolve()) or r.get("vocab_size") != vocab:
        return {}
    return r.get("shards", {})


def verify_shards(folder: str | os.PathLike, manifest: dict, vocab_size: int | None = None, *,
                  checksums: bool = True, which: tuple[int, int] | None = None,
                  shards: Iterable[str] | None = None, record: str | os.PathLike | None = None) -> dict:
    """Check shards against the manifest; raise a UserError naming the first shard that differs, and how.

    Always: the file exists, has the manifest's size, and its Arrow schema has the manifest's columns, block
    size (the fixed list size) and dtype. With ``checksums`` (the default), also in one sequential pass per shard
    read with ordinary reads (not a memory map: touching every page of a map would count the whole shard in this
    process's RSS): its sha256, its row count (the manifest's ``sequences``), every token id < ``vocab_size``
    (default: the manifest tokenizer's) and every doc_starts offset inside its sequence. Instruction-tuning
    shards (format SFT_FORMAT) are checked for their own columns as well (``_verify_sft_one``).

    ``which=(rank, world)`` checks only this rank's share (``shard_subsets``), ``shards`` only the named files.
    ``record``: a JSON file of the shards already verified ({file: [size, mtime_ns, ctime_ns, sha256]}, with the
    folder and vocabulary size); a shard whose size and times are unchanged and whose sha256 is still the
    manifest's is skipped, and the file is updated after each shard checked. Give each rank a record file of
    its own (concurrent writers lose updates: only the saving, never the check).

    Returns {"shards": checked, "bytes": bytes read in full (0 without checksums), "from_record": skipped,
    "seconds": wall time}. Speed: about 1 GB/s per process when the file is in the page cache (sha256 is the
    bound: 1.3 GB/s alone), on one core of an AMD EPYC; one pass with the hash in the reader measured 5-10%
    faster than hashing and parsing in two reads.
    """
    t0 = time.time()
    folder = Path(folder)
    vocab = int(vocab_size if vocab_size is not None else manifest["tokenizer"]["vocab_size"])
    block, dtype = int(manifest["block_size"]), np.dtype(manifest["dtype"])
    columns = manifest.get("columns")
    sft = manifest.get("format") == SFT_FORMAT
    schema_check = check_sft_schema if sft else check_schema
    todo = shard_list(manifest)
    if shards is not None:
        wanted = set(shards)
        unknown = wanted - {x["file"] for x in todo}
        if unknown:
            raise UserError(f"{folder}: the manifest names no shard {sorted(unknown)[0]}")
        todo = [x for x in todo if x["file"] in wanted]
    if which is not None:
        rank, world = which
        mine = set(shard_subsets(manifest, world)[rank])
        todo = [x for x in todo if x["file"] in mine]
    rec_path = Path(record) if record else None
    done = _read_record(rec_path, folder, vocab) if rec_path and checksums else {}
    checked = from_record = nbytes = 0
    for shard in todo:
        p = folder / shard["file"]
        try:
            st = p.stat()
        except FileNotFoundError:
            raise UserError(f"shard {p} named in the manifest is missing") from None
        except OSError as exc:
            raise files.os_error(exc, p, "read") from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"shard {p} is not a regular file")
        if st.st_size != shard["bytes"]:
            raise UserError(f"shard {p} has {st.st_size:,} bytes, the manifest says {shard['bytes']:,}: corrupt or "
                            "cut short (re-run `cllama preprocess`, or restore the file)")
        if not checksums:
            try:
                with pa.OSFile(str(p), "rb") as f:
                    schema_check(p, pa.ipc.open_stream(f).schema, block, dtype, columns)
            except UserError:
                raise
            except Exception as exc:
                raise _arrow_failure(p, exc) from None
            checked += 1
            continue
        if done.get(shard["file"]) == [st.st_size, st.st_mtime_ns, st.st_ctime_ns, shard["sha256"]]:
            from_record += 1
            continue
        if sft:
            _verify_sft_one(p, shard, block, dtype, columns, vocab, manifest.get("layout"))
        else:
            _verify_one(p, shard, block, dtype, columns, vocab)
        checked += 1
        nbytes += st.st_size
        if rec_path:
            done[shard["file"]] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, shard["sha256"]]
            files.write_atomic(rec_path, json.dumps({"format": RECORD_FORMAT, "folder": str(folder.resolve()),
                                                     "vocab_size": vocab, "shards": done}, indent=0) + "\n")
    return {"shards": checked, "bytes": nbytes, "from_record": from_record, "seconds": round(time.time() - t0, 3)}


def _verify_one(p: Path, shard: dict, block: int, dtype: np.dtype, columns: list[str] | None, vocab: int) -> None:
    rows = 0
    try:
        with open(p, "rb") as raw:
            hr = _HashingReader(raw)
            reader = pa.ipc.open_stream(pa.PythonFile(hr, mode="r"))
            check_schema(p, reader.schema, block, dtype, columns)
            starts_col = reader.schema.names.index("doc_starts") if "doc_starts" in reader.schema.names else None
            size_cols = [reader.schema.names.index(c) for c in SIZE_COLUMNS if c in reader.schema.names]
            totals = [0] * len(size_cols)
            for batch in reader:
                ids = batch.column(0)
                if ids.null_count:
                    raise UserError(f"shard {p}: input_ids has nulls near sequence {rows:,}: corrupt")
                values = ids.flatten().to_numpy(zero_copy_only=False)
                if len(values) != batch.num_rows * block:
                    raise UserError(f"shard {p}: a batch near sequence {rows:,} holds {len(values):,} token ids "
                                    f"for {batch.num_rows:,} sequences of {block}: corrupt")
                if len(values) and int(values.max()) >= vocab:
                    at = int(np.argmax(values >= vocab))
                    raise UserError(f"shard {p}: sequence {rows + at // block:,} holds token id {int(values[at]):,}, "
                                    f"outside the tokenizer's {vocab:,} ids (shards of another tokenizer?)")
                if starts_col is not None:
                    ds = batch.column(starts_col).flatten().to_numpy(zero_copy_only=False)
                    if len(ds) and (int(ds.min()) < 0 or int(ds.max()) >= block):
                        raise UserError(f"shard {p}: a doc_starts offset near sequence {rows:,} is outside 0..{block - 1}")
                for k, col in enumerate(size_cols):
                    v = batch.column(col).to_numpy(zero_copy_only=False)
                    if len(v) and int(v.min()) < 0:
                        raise UserError(f"shard {p}: a negative {SIZE_COLUMNS[k]} near sequence {rows:,}: corrupt")
                    totals[k] += int(v.sum())
                rows += batch.num_rows
            hr.drain()
    except UserError:
        raise
    except Exception as exc:
        raise _arrow_failure(p, exc) from None
    if rows != shard["sequences"]:
        raise UserError(f"shard {p} holds {rows:,} sequences, the manifest says {shard['sequences']:,}")
    for col, total, key in zip(SIZE_COLUMNS, totals, ("characters", "utf8_bytes")):
        if key in shard and total != shard[key]:
            raise UserError(f"shard {p}: its {col} add up to {total:,}, the manifest says {shard[key]:,}: corrupt")
    if hr.n != shard["bytes"]:
        raise UserError(f"shard {p}: read {hr.n:,} bytes, the manifest says {shard['bytes']:,} (it changed while "
                        "being checked?)")
    if hr.h.hexdigest() != shard["sha256"]:
        raise UserError(f"shard {p} does not match its sha256 in the manifest: corrupt (re-run `cllama preprocess`, "
                        "or restore the file)")


# ------------------------------------------------------------------------------ instruction-tuning shards
#
# Format SFT_FORMAT ("cllama-sft-shards/1", written by data/sft.py). Arrow IPC stream files like the pre-training
# shards, ROWS_PER_BATCH rows per record batch, one row per block of ``block_size`` tokens:
#   input_ids       fixed_size_list<uint16 | uint32, block_size>  the tokens, then pad_id up to block_size
#   loss_mask       fixed_size_list<uint8, block_size>            1 on response tokens and their EOS, else 0
#   example_starts  list<int32>                                   offset of each example in the row: [0, ...]
#   n_tokens        int32                                         real tokens; [n_tokens, block_size) is padding
# Row invariants (verify_shards checks every one): ids < vocabulary, loss_mask in {0, 1} and 0 on padding,
# example_starts non-empty, starting at 0, strictly increasing, below n_tokens, 1 <= n_tokens <= block_size;
# in the padded layout exactly one example per row.


def sft_schema(block_size: int, dtype: np.dtype) -> pa.Schema:
    return pa.schema([
        pa.field("input_ids", pa.list_(pa.from_numpy_dtype(dtype), block_size), nullable=False),
        pa.field("loss_mask", pa.list_(pa.uint8(), block_size), nullable=False),
        pa.field("example_starts", pa.list_(pa.int32()), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
    ])


def check_sft_schema(path: str | os.PathLike, sch: pa.Schema, block_size: int | None = None,
                     dtype: np.dtype | str | None = None, columns: list[str] | None = None) -> tuple[int, np.dtype]:
    """``check_schema`` for an instruction-tuning shard: input_ids as there, and the other three columns of
    SFT_COLUMNS with their exact types."""
    missing = [c for c in SFT_COLUMNS if c not in sch.names]
    if missing:
        raise UserError(f"shard {path} has no {', '.join(missing)} column (columns: {', '.join(sch.names)}): not an "
                        "instruction-tuning shard (`cllama preprocess-sft` writes them)")
    block, held = check_schema(path, sch, block_size, dtype, columns)
    want = sft_schema(block, held)
    for name in SFT_COLUMNS[1:]:
        if not sch.field(name).type.equals(want.field(name).type):
            raise UserError(f"shard {path}: column {name} is {sch.field(name).type}, expected {want.field(name).type}: "
                            "not written by cllama")
    return block, held


class SFTShardWriter(_StreamWriter):
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
        return _buffer_at(self, buf, need, pos)

    def close(self) -> None:
        self.u8 = self.i32 = None  # type: ignore[assignment]
        super().close()


def load_sft_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of an instruction-tuning shard folder (refusing pre-training shards, naming them)."""
    return load_manifest(folder, formats=(SFT_FORMAT,))


def check_sft_manifest(manifest: dict, fingerprint: dict, block_size: int, where: str = "shards",
                       template_sha256: str | None = None) -> None:
    """What the trainer checks before building anything on instruction-tuning shards: the format, the tokenizer
    fingerprint and block size (``check_manifest``), and, when given, the chat template's sha256 (the template
    the exported tokenizer will carry must be the one the shards were rendered with)."""
    if manifest.get("format") != SFT_FORMAT:
        raise UserError(f"{where}: format {manifest.get('format')!r} is not instruction-tuning shards ({SFT_FORMAT!r}); "
                        "make them with `cllama preprocess-sft`")
    check_manifest(manifest, fingerprint, block_size, where)
    if template_sha256 is not None and manifest["template"]["sha256"] != template_sha256:
        t = manifest["template"]
        raise UserError(f"{where} were rendered with chat template {t['name']} (sha256 {t['sha256'][:16]}...), this run "
                        f"expects sha256 {template_sha256[:16]}...: re-run `cllama preprocess-sft` with this template")


def _verify_sft_one(p: Path, shard: dict, block: int, dtype: np.dtype, columns: list[str] | None, vocab: int,
                    layout: str | None) -> None:
    rows = examples = tokens = response = 0
    try:
        with open(p, "rb") as raw:
            hr = _HashingReader(raw)
            reader = pa.ipc.open_stream(pa.PythonFile(hr, mode="r"))
            check_sft_schema(p, reader.schema, block, dtype, columns)
            for batch in reader:
                n = batch.num_rows
                where = f"shard {p}: near row {rows:,}"
                cols = [batch.column(k) for k in range(4)]
                if any(c.null_count for c in cols):
                    raise UserError(f"{where}, a column has nulls: corrupt")
                ids = cols[0].flatten().to_numpy(zero_copy_only=False)
                mask = cols[1].flatten().to_numpy(zero_copy_only=False)
                ntok = cols[3].to_numpy(zero_copy_only=False).astype(np.int64)
                offs = cols[2].offsets.to_numpy(zero_copy_only=False).astype(np.int64)
                starts = cols[2].flatten().to_numpy(zero_copy_only=False).astype(np.int64)
                if len(ids) != n * block or len(mask) != n * block:
                    raise UserError(f"{where}, a batch holds {len(ids):,} ids and {len(mask):,} mask values for {n:,} "
                                    f"rows of {block}: corrupt")
                if len(ids) and int(ids.max()) >= vocab:
                    at = int(np.argmax(ids >= vocab))
                    raise UserError(f"shard {p}: row {rows + at // block:,} holds token id {int(ids[at]):,}, outside the "
                                    f"tokenizer's {vocab:,} ids (shards of another tokenizer?)")
                if len(mask) and int(mask.max()) > 1:
                    raise UserError(f"{where}, loss_mask holds {int(mask.max())}: a mask is 0 or 1")
                _check_rows(p, rows, block, mask.reshape(n, block), ntok, offs, starts, layout)
                rows += n
                examples += len(starts)
                tokens += int(ntok.sum())
                response += int(mask.sum(dtype=np.int64))
            hr.drain()
    except UserError:
        raise
    except Exception as exc:
        raise _arrow_failure(p, exc) from None
    got = {"rows": rows, "examples": examples, "tokens": tokens, "response_tokens": response}
    for key, value in got.items():
        if key in shard and value != shard[key]:
            raise UserError(f"shard {p} holds {value:,} {key.replace('_', ' ')}, the manifest says {shard[key]:,}")
    if hr.n != shard["bytes"]:
        raise UserError(f"shard {p}: read {hr.n:,} bytes, the manifest says {shard['bytes']:,} (it changed while "
                        "being checked?)")
    if hr.h.hexdigest() != shard["sha256"]:
        raise UserError(f"shard {p} does not match its sha256 in the manifest: corrupt (re-run `cllama preprocess-sft`, "
                        "or restore the file)")


def _check_rows(p: Path, first: int, block: int, mask: np.ndarray, ntok: np.ndarray, offs: np.ndarray,
                starts: np.ndarray, layout: str | None) -> None:
    """The row invariants of one batch (see the format above), vectorised; the error names the first bad row."""
    n = len(ntok)
    per_row = np.diff(offs)
    checks: list[tuple[np.ndarray, str]] = []
    checks.append(((ntok < 1) | (ntok > block), f"n_tokens outside 1..{block}"))
    checks.append((per_row < 1, "no example_starts"))
    if layout == "padded":
        checks.append((per_row != 1, "more than one example (the padded layout holds one a row)"))
    if len(starts):
        row_of = np.repeat(np.arange(n), per_row)
        first_of_row = np.zeros(len(starts), bool)
        first_of_row[offs[:-1][per_row > 0] - offs[0]] = True
        r = np.zeros(n, bool)
        r[row_of[first_of_row & (starts != 0)]] = True
        checks.append((r, "example_starts does not begin at 0"))
        r = np.zeros(n, bool)
        step = np.diff(starts)
        same_row = ~first_of_row[1:]
        r[row_of[1:][same_row & (step <= 0)]] = True
        checks.append((r, "example_starts not strictly increasing"))
        r = np.zeros(n, bool)
        r[row_of[starts >= ntok[row_of]]] = True
        checks.append((r, "an example starts at or after n_tokens"))
    checks.append((((np.arange(block)[None, :] >= ntok[:, None]) & (mask != 0)).any(axis=1),
                   "loss_mask is 1 on padding (past n_tokens)"))
    for rows_bad, what in checks:
        if rows_bad.any():
            k = int(np.argmax(rows_bad))
            raise UserError(f"shard {p}: row {first + k:,}: {what}: corrupt or not written by cllama")
