"""Streaming corpus readers: .txt / .jsonl / .parquet, each optionally .gz or .zst.

Nothing here loads a file whole. Bad records (invalid UTF-8, malformed JSON, a missing text field,
empty documents, documents over a size limit) are skipped and counted by reason, or, with
``strict``, raise a ``UserError`` that names the file and the line (or byte offset).

Uncompressed .txt and .jsonl files can be read by byte range: a record belongs to the range in which
its first byte lies, so any set of ranges that tiles a file reads every record exactly once. This is
what lets several Slurm array tasks share one huge file.
"""

from __future__ import annotations

import collections
import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from ..errors import UserError

FORMATS = ("txt", "jsonl", "parquet")
COMPRESSIONS = ("", "gz", "zst")

# Skip reasons, in the order reports list them.
SKIP_REASONS = ("invalid_utf8", "malformed_json", "missing_field", "empty", "too_long")


@dataclass(frozen=True)
class Source:
    """One input file, with its format and compression read off its name."""

    path: str
    fmt: str
    compression: str
    size: int

    @property
    def splittable(self) -> bool:
        """Whether the file can be read by byte range (plain text formats, uncompressed)."""
        return self.compression == "" and self.fmt in ("txt", "jsonl")


def classify(path: str | os.PathLike) -> tuple[str, str] | None:
    """(format, compression) of a file name, or None when the name is not a supported corpus file."""
    name = os.path.basename(str(path)).lower()
    compression = ""
    for c in ("gz", "zst"):
        if name.endswith("." + c):
            compression, name = c, name[: -len(c) - 1]
            break
    for fmt in FORMATS:
        if name.endswith("." + fmt):
            return fmt, compression
    if name.endswith(".json"):  # JSON Lines saved with the short extension
        return "jsonl", compression
    return None


def resolve_inputs(patterns: list[str]) -> list[Source]:
    """Expand files, folders (recursively) and globs into a sorted, de-duplicated list of sources.

    Fails, naming the pattern, when something given matches no file or is of an unsupported type, and
    when the whole list is empty.
    """
    if not patterns:
        raise UserError("no corpus given: pass files, folders or globs of .txt / .jsonl / .parquet")
    found: dict[str, Source] = {}
    for pattern in patterns:
        candidates: list[str]
        if os.path.isdir(pattern):
            candidates = [
                os.path.join(root, n) for root, _, names in os.walk(pattern) for n in names if classify(n)
            ]
            if not candidates:
                raise UserError(f"folder {pattern} holds no .txt, .jsonl or .parquet files (optionally .gz/.zst)")
        elif os.path.isfile(pattern):
            if classify(pattern) is None:
                raise UserError(
                    f"{pattern}: unsupported corpus file type; expected .txt, .jsonl or .parquet, "
                    "optionally with .gz or .zst"
                )
            candidates = [pattern]
        else:
            candidates = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p) and classify(p)]
            if not candidates:
                raise UserError(f"corpus input not found: {pattern} (no such file, folder or matching glob)")
        for c in candidates:
            real = os.path.abspath(c)
            fmt, compression = classify(c)  # type: ignore[misc]
            found[real] = Source(real, fmt, compression, os.path.getsize(real))
    return [found[k] for k in sorted(found)]


class SkipCounter(collections.Counter):
    """Counts of skipped records by reason."""

    def as_dict(self) -> dict[str, int]:
        return {r: int(self.get(r, 0)) for r in SKIP_REASONS}


@dataclass
class Document:
    text: str
    source: str
    line: int  # 1-based line (txt/jsonl, when read from the file start) or row (parquet); 0 if unknown
    offset: int  # byte offset of the record in the (uncompressed) file, or the row index for parquet


def _where(source: str, line: int, offset: int) -> str:
    return f"{source}:{line}" if line > 0 else f"{source} (byte {offset})"


def _open_binary(src: Source) -> BinaryIO:
    if src.compression == "gz":
        return gzip.open(src.path, "rb")  # type: ignore[return-value]
    if src.compression == "zst":
        import zstandard

        raw = open(src.path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))  # type: ignore[arg-type]
    return open(src.path, "rb")


class RecordReader:
    """Reads documents from sources with one skip policy and one set of counters."""

    def __init__(self, text_field: str = "text", strict: bool = False, max_chars: int = 0):
        self.text_field = text_field
        self.strict = strict
        self.max_chars = max_chars
        self.skipped = SkipCounter()

    def _skip(self, reason: str, where: str, detail: str) -> None:
        if self.strict:
            raise UserError(f"{where}: {detail} (drop --strict to skip and count such records)")
        self.skipped[reason] += 1

    def _accept(self, text: str, where: str) -> bool:
        if not text or text.isspace():
            self._skip("empty", where, "empty document")
            return False
        if self.max_chars and len(text) > self.max_chars:
            self._skip("too_long", where, f"document of {len(text)} characters exceeds max {self.max_chars}")
            return False
        return True

    def read(self, src: Source, start: int = 0, end: int | None = None) -> Iterator[Document]:
        """Documents of ``src``; for splittable files only those starting in bytes [start, end)."""
        if src.fmt == "parquet":
            yield from self._read_parquet(src, start, end)
            return
        if (start or end is not None) and not src.splittable:
            raise ValueError(f"{src.path} cannot be read by byte range")
        try:
            with _open_binary(src) as fh:
                yield from self._read_lines(src, fh, start, end)
        except (OSError, EOFError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise UserError(f"corpus file disappeared: {src.path}") from None
            kind = {"gz": "gzip", "zst": "zstd"}.get(src.compression, "")
            raise UserError(f"{src.path}: cannot read {kind} stream, the file is corrupt or truncated ({exc})") from None
        except Exception as exc:  # zstandard raises its own ZstdError
            if type(exc).__name__ == "ZstdError":
                raise UserError(f"{src.path}: corrupt or truncated zstd stream ({exc})") from None
            raise

    def _read_lines(self, src: Source, fh: BinaryIO, start: int, end: int | None) -> Iterator[Document]:
        offset = 0
        line_no = 1
        if start > 0:
            # A record belongs to the range holding its first byte: unless the byte before `start` ends
            # a line, the line under `start` started earlier and is the previous range's.
            fh.seek(start - 1)
            offset = start - 1
            first = fh.readline()
            offset += len(first)
            line_no = 0  # unknown from here on: report byte offsets
        is_json = src.fmt == "jsonl"
        field = self.text_field
        for raw in fh:
            if end is not None and offset >= end:
                break
            here = offset
            offset += len(raw)
            this_line = line_no
            if line_no:
                line_no += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                self._skip("invalid_utf8", _where(src.path, this_line, here), f"invalid UTF-8 ({exc.reason} at column {exc.start})")
                continue
            if is_json:
                if not line.strip():
                    self._skip("empty", _where(src.path, this_line, here), "empty line")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    self._skip("malformed_json", _where(src.path, this_line, here), f"malformed JSON ({exc.msg})")
                    continue
                if not isinstance(obj, dict):
                    self._skip("malformed_json", _where(src.path, this_line, here), "JSON line is not an object")
                    continue
                text = obj.get(field)
                if not isinstance(text, str):
                    what = "missing" if text is None else f"not a string ({type(text).__name__})"
                    self._skip("missing_field", _where(src.path, this_line, here), f"text field {field!r} {what}")
                    continue
                if "\\ud" in line or "\\uD" in line:  # JSON escapes can smuggle in lone surrogates
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        self._skip("invalid_utf8", _where(src.path, this_line, here), "lone surrogate escape in JSON string")
                        continue
            else:
                text = line.rstrip("\r\n")
            if self._accept(text, _where(src.path, this_line, here)):
                yield Document(text, src.path, this_line, here)

    def _read_parquet(self, src: Source, start: int, end: int | None) -> Iterator[Document]:
        """Parquet ranges are row-group ranges [start, end)."""
        import pyarrow.parquet as pq

        tmp = None
        try:
            if src.compression:
                # Parquet needs random access to its footer: decompress to a temporary file first.
                import tempfile

                tmp = tempfile.NamedTemporaryFile(suffix=".parquet", delete=False)
                with _open_binary(src) as fh:
                    while chunk := fh.read(1 << 20):
                        tmp.write(chunk)
                tmp.close()
                pf = pq.ParquetFile(tmp.name)
            else:
                pf = pq.ParquetFile(src.path)
        except Exception as exc:
            if tmp is not None:
                os.unlink(tmp.name)
            raise UserError(f"{src.path}: not a readable Parquet file ({exc})") from None
        try:
            if self.text_field not in pf.schema_arrow.names:
                raise UserError(
                    f"{src.path}: no column {self.text_field!r}; columns are {pf.schema_arrow.names} "
                    "(set --text-field)"
                )
            groups = list(range(pf.num_row_groups))[start:end]
            row = sum(pf.metadata.row_group(g).num_rows for g in range(start)) if start else 0
            for g in groups:
                col = pf.read_row_group(g, columns=[self.text_field]).column(0)
                for value in col.to_pylist():
                    row += 1
                    where = f"{src.path} row {row}"
                    if not isinstance(value, str):
                        self._skip("missing_field", where, f"text column {self.text_field!r} is null or not a string")
                        continue
                    if self._accept(value, where):
                        yield Document(value, src.path, row, row - 1)
        finally:
            if tmp is not None:
                os.unlink(tmp.name)

