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
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import UserError

MANIFEST = "manifest.json"
FORMAT = "cllama-shards/1"
ROWS_PER_BATCH = 1024  # fixed, so that files are byte-identical however the stream arrived


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def schema(block_size: int, dtype: np.dtype, boundaries: bool) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(pa.from_numpy_dtype(dtype), block_size), nullable=False)]
    if boundaries:
        fields.append(pa.field("doc_starts", pa.list_(pa.int32()), nullable=False))
    return pa.schema(fields)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Writes sequences to ``path + '.tmp'``; ``close()`` renames it into place and returns its record."""

    def __init__(self, path: Path, block_size: int, dtype: np.dtype, boundaries: bool):
        self.path, self.block, self.dtype, self.boundaries = Path(path), block_size, dtype, boundaries
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.schema = schema(block_size, dtype, boundaries)
        self._sink = pa.OSFile(str(self.tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._rows: list[np.ndarray] = []
        self._starts: list[list[int]] = []
        self._pending = 0
        self.sequences = 0

    def add(self, blocks: np.ndarray, starts: list[list[int]] | None = None) -> None:
        """Append sequences: ``blocks`` is (n, block_size)."""
        if len(blocks) == 0:
            return
        self._rows.append(blocks)
        if self.boundaries:
            self._starts.extend(starts or [])
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
        self._writer.write_batch(pa.record_batch(cols, schema=self.schema))

    def close(self) -> dict:
        if self._pending:
            self._flush(self._pending)
        self._writer.close()
        self._sink.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "sequences": self.sequences, "tokens": self.sequences * self.block,
                "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path)}

    def abort(self) -> None:
        try:
            self._writer.close()
            self._sink.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def read_shard(path: str | os.PathLike) -> pa.Table:
    """Memory-mapped, zero-copy read of one shard."""
    return pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()


def shard_tokens(path: str | os.PathLike) -> np.ndarray:
    """The shard's ``input_ids`` as an (n, block_size) numpy view on the memory map."""
    table = read_shard(path)
    col = table.column("input_ids")
    if col.num_chunks == 0:
        return np.zeros((0, col.type.list_size), dtype=col.type.value_type.to_pandas_dtype())
    block = col.type.list_size
    parts = [c.values.to_numpy(zero_copy_only=True).reshape(-1, block) for c in col.chunks]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def load_manifest(folder: str | os.PathLike) -> dict:
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
    if m.get("format") != FORMAT:
        raise UserError(f"{p}: unknown shard format {m.get('format')!r}, expected {FORMAT!r}")
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


def verify_shards(folder: str | os.PathLike, manifest: dict, checksums: bool = True) -> None:
    """Every shard the manifest names exists with its size and (optionally) its sha256."""
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            p = Path(folder) / shard["file"]
            if not p.is_file():
                raise UserError(f"shard {p} named in the manifest is missing")
            if p.stat().st_size != shard["bytes"]:
                raise UserError(f"shard {p} has {p.stat().st_size} bytes, the manifest says {shard['bytes']}: corrupt")
            if checksums and sha256_file(p) != shard["sha256"]:
                raise UserError(f"shard {p} does not match its sha256 in the manifest: corrupt")
