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
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import time
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .. import files
from ..errors import UserError

FORMATS = ("txt", "jsonl", "parquet")
COMPRESSIONS = ("", "gz", "zst")

# Skip reasons, in the order reports list them.
SKIP_REASONS = ("invalid_utf8", "malformed_json", "missing_field", "empty", "too_long")


@dataclass(frozen=True)
class Source:
    """One input file, with its format and compression read off its name.

    ``path`` is the file as named (absolute; what messages show); ``real`` is the file itself, symlinks
    resolved (what identifies it). ``size`` and ``mtime_ns`` are what the file was when it was found: a
    reader refuses a file that no longer matches them, instead of reading a corpus that changes under it.
    """

    path: str
    fmt: str
    compression: str
    size: int
    real: str = ""
    mtime_ns: int = 0  # 0: not recorded (a Source built by hand), nothing is compared

    @property
    def splittable(self) -> bool:
        """Whether the file can be read by byte range (plain text formats, uncompressed)."""
        return self.compression == "" and self.fmt in ("txt", "jsonl")

    def changes(self, st: os.stat_result) -> str | None:
        """How ``st`` differs from the file as it was found, in words; None when it does not."""
        if not self.mtime_ns:
            return None
        parts = []
        if st.st_size != self.size:
            parts.append(f"size {self.size:,} -> {st.st_size:,} bytes")
        if st.st_mtime_ns != self.mtime_ns:
            parts.append(f"modified {_when(self.mtime_ns)} -> {_when(st.st_mtime_ns)}")
        return "; ".join(parts) or None


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


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) + f".{ns % 10**9:09d}"


SAMPLE_BYTES = 1 << 16


def content_sample(path: str | os.PathLike, size: int) -> str:
    """sha256 of the first, middle and last 64 KiB (the whole file when smaller than 192 KiB).

    With the size and modification time it identifies a file's content cheaply: an edit in place that keeps
    the size (and, through a copy tool, the modification time) still changes the sample, unless it touches
    none of the three windows; a complete hash of a large corpus on every run would cost a full read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if size <= 3 * SAMPLE_BYTES:
                h.update(f.read())
            else:
                for at in (0, size // 2 - SAMPLE_BYTES // 2, size - SAMPLE_BYTES):
                    f.seek(at)
                    h.update(f.read(SAMPLE_BYTES))
    except OSError as exc:
        raise files.os_error(exc, path, "read") from None
    return h.hexdigest()


class Inputs(list):
    """The sources found (a list of Source), with what was left out: reason -> paths.

    Reasons: ``special`` (FIFOs, sockets, devices in a folder or glob: never opened, a read would block or
    never end), ``dangling`` (symlinks to nothing), ``duplicate`` (a file reached a second time through a
    symlink or an overlapping pattern: read once).
    """

    def __init__(self, sources: list[Source], skipped: dict[str, list[str]]):
        super().__init__(sources)
        self.skipped = skipped


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _special_kind(mode: int) -> str | None:
    for test, name in _SPECIAL_KINDS:
        if test(mode):
            return name
    return None


def _examine(path: str) -> tuple[str, os.stat_result | str]:
    """("file", stat) for a regular file; otherwise (reason, description) without opening anything."""
    try:
        st = os.stat(path)  # follows symlinks; never opens, so a FIFO cannot block here
    except FileNotFoundError:
        if os.path.islink(path):
            return "dangling", f"a symlink to {os.path.join(os.path.dirname(path), os.readlink(path))}, which does not exist"
        return "missing", "not found"
    except OSError as exc:
        raise files.os_error(exc, path, "read") from None
    if stat.S_ISDIR(st.st_mode):
        return "folder", "a folder"
    kind = _special_kind(st.st_mode)
    if kind:
        return "special", kind
    return "file", st


def _readable(path: str) -> None:
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied (a corpus file must be readable by this user)")


def _walk(folder: str) -> Iterator[str]:
    """Files under ``folder``, following symlinked folders once each (a link back up is not a loop)."""
    seen: set[str] = set()

    def fail(exc: OSError) -> None:
        raise files.os_error(exc, exc.filename or folder, "read") from None

    for root, dirs, names in os.walk(folder, followlinks=True, onerror=fail):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for n in sorted(names):
            yield os.path.join(root, n)


def _glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, except that ``**`` never follows a symlink back into a folder it is
    already inside. glob's ``**`` follows every symlinked folder, so a link to an ancestor repeats the tree under
    it until the path is too long, and two such links (DIR/a -> DIR, DIR/b -> DIR) double it at every level: it
    never returns. Like ``_walk``, each route stops where it would loop; everything else matches as glob does
    (hidden names only by a pattern that starts with '.', ``**`` as zero or more folders)."""
    if "**" not in pattern:
        return glob.glob(pattern, recursive=True)
    head, parts = ("/", pattern.lstrip("/").split("/")) if pattern.startswith("/") else ("", pattern.split("/"))
    return sorted(set(_expand(head, [x for x in parts if x], frozenset())))


def _expand(base: str, parts: list[str], inside: frozenset[str]) -> Iterator[str]:
    """The paths under ``base`` that match ``parts``; ``inside``: the real paths of the folders the route went
    through by ``**``."""
    if not parts:
        yield base
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        inside = inside | {os.path.realpath(base or ".")}
        yield from _expand(base, rest, inside) if rest else (os.path.join(base, n) for n in _names(base, "*", False))
        for name in _names(base, "*", True):
            sub = os.path.join(base, name)
            if os.path.realpath(sub) not in inside:  # else a link back into a folder this route is inside: a loop
                yield from _expand(sub, parts, inside)
    elif glob.has_magic(part):
        for name in _names(base, part, bool(rest)):
            yield from _expand(os.path.join(base, name), rest, inside)
    else:
        path = os.path.join(base, part)
        if os.path.isdir(path) if rest else os.path.lexists(path):
            yield from _expand(path, rest, inside)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop (a -> b, b -> a): not a folder
        return False


def _names(folder: str, pattern: str, folders_only: bool) -> list[str]:
    """The entries of ``folder`` matching ``pattern`` (hidden ones only for a pattern starting with '.'), as
    glob lists them: unreadable folders hold nothing, symlinked folders count as folders."""
    try:
        with os.scandir(folder or ".") as it:
            entries = [(e.name, _is_dir(e)) for e in it]
    except OSError:
        return []
    hidden = pattern.startswith(".")
    return [n for n, is_dir in entries if (is_dir or not folders_only) and (hidden or not n.startswith("."))
            and fnmatch.fnmatch(n, pattern)]


def resolve_inputs(patterns: list[str], quiet: bool = False) -> Inputs:
    """Expand files, folders (recursively) and globs into a sorted, de-duplicated list of sources.

    Fails, naming the pattern, when something given matches no file, is of an unsupported type, is not a
    regular file (a FIFO given by name would block the reader forever) or cannot be read, and when the whole
    list is empty. Inside folders and globs, special files and dangling symlinks are skipped and counted
    (``Inputs.skipped``), with a note on stderr unless ``quiet``. A file reached twice (a symlink beside its
    target, overlapping patterns) is one source: de-duplicated by real path, named by its first path in
    sorted order.
    """
    if not patterns:
        raise UserError("no corpus given: pass files, folders or globs of .txt / .jsonl / .parquet")
    found: list[tuple[str, str, os.stat_result]] = []  # (path as named, real path, stat)
    skipped: dict[str, list[str]] = {"special": [], "dangling": [], "duplicate": []}

    def consider(path: str) -> bool:
        kind, info = _examine(path)
        if kind == "file":
            _readable(path)
            found.append((os.path.abspath(path), os.path.realpath(path), info))  # type: ignore[arg-type]
            return True
        if kind in ("special", "dangling"):
            skipped[kind].append(os.path.abspath(path))
        return False

    for pattern in patterns:
        kind, info = _examine(pattern)
        if kind == "folder":
            candidates = [p for p in _walk(pattern) if classify(p)]
            if not candidates:
                raise UserError(f"folder {pattern} holds no .txt, .jsonl or .parquet files (optionally .gz/.zst)")
            for c in candidates:
                consider(c)
        elif kind == "file":
            if classify(pattern) is None:
                raise UserError(
                    f"{pattern}: unsupported corpus file type; expected .txt, .jsonl or .parquet, "
                    "optionally with .gz or .zst"
                )
            consider(pattern)
        elif kind in ("special", "dangling"):
            why = ", not a regular file (reading it could block forever)" if kind == "special" else ""
            raise UserError(f"{pattern} is {info}{why}: a corpus input is a file, a folder or a glob")
        else:
            candidates = sorted(p for p in _glob(pattern) if classify(p) and not os.path.isdir(p))
            before = len(found) + sum(map(len, skipped.values()))
            for c in candidates:
                consider(c)
            if len(found) + sum(map(len, skipped.values())) == before:
                raise UserError(f"corpus input not found: {pattern} (no such file, folder or matching glob)")
    by_real: dict[str, Source] = {}
    for path, real, st in sorted(found):
        if real in by_real:
            if by_real[real].path != path:
                skipped["duplicate"].append(path)
            continue
        fmt, compression = classify(path)  # type: ignore[misc]
        by_real[real] = Source(path, fmt, compression, st.st_size, real, st.st_mtime_ns)
    sources = sorted(by_real.values(), key=lambda s: s.path)
    if not sources:
        raise UserError(f"no readable corpus file in {', '.join(map(str, patterns))} "
                        f"(skipped: {', '.join(f'{len(v)} {k}' for k, v in skipped.items() if v)})")
    if not quiet:
        _note_skipped(skipped)
    return Inputs(sources, skipped)


def _note_skipped(skipped: dict[str, list[str]]) -> None:
    notes = {"special": ("special file (FIFO, socket or device), never opened",
                         "special files (FIFO, socket or device), never opened"),
             "dangling": ("dangling symlink (pointing to nothing)", "dangling symlinks (pointing to nothing)"),
             "duplicate": ("second name of a file already in the corpus (a symlink or overlapping patterns), read once",
                           "second names of files already in the corpus (symlinks or overlapping patterns), read once")}
    for reason, paths in skipped.items():
        if paths:
            noun = notes[reason][len(paths) > 1]
            more = ", ..." if len(paths) > 3 else ""
            print(f"note: skipped {len(paths)} {noun}: {', '.join(paths[:3])}{more}", file=sys.stderr, flush=True)


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


def _decompressed(src: Source, raw: BinaryIO) -> BinaryIO:
    """The file's uncompressed bytes, streamed from ``raw`` (left open: the caller closes it)."""
    if src.compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if src.compression == "zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False))  # type: ignore[arg-type]
    return raw


def open_binary(src: Source) -> BinaryIO:
    """The uncompressed bytes of ``src`` (closing it closes the file)."""
    raw = open(src.path, "rb")
    if not src.compression:
        return raw
    fh = _decompressed(src, raw)
    close = fh.close

    def close_both() -> None:
        close()
        raw.close()

    fh.close = close_both  # type: ignore[method-assign]
    return fh


def _read_failure(src: Source, exc: BaseException) -> UserError:
    """A read error in words: an OS error (permission, disk) as such, anything else as a damaged file."""
    if isinstance(exc, FileNotFoundError):
        return UserError(f"corpus file disappeared: {src.path} (was it moved or deleted while being read?)")
    if isinstance(exc, OSError) and exc.errno is not None:
        return files.os_error(exc, src.path, "read")
    kind = {"gz": "gzip", "zst": "zstd"}.get(src.compression, src.fmt)
    return UserError(f"{src.path}: cannot read the {kind} stream, the file is corrupt or truncated ({exc})")


def check_unchanged(src: Source, st: os.stat_result | None = None) -> None:
    """Refuse a source whose size or modification time is no longer what it was when it was found."""
    if not src.mtime_ns:
        return
    if st is None:
        try:
            st = os.stat(src.path)
        except OSError as exc:
            raise _read_failure(src, exc) from None
    change = src.changes(st)
    if change:
        raise UserError(f"{src.path}: changed while being read ({change}); another program is writing it: "
                        "run again when it no longer changes")


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
        """Documents of ``src``; for splittable files only those starting in bytes [start, end).

        The file is checked against its size and modification time when found, before the first document and
        after the last: a file that shrinks, grows or is rewritten while it is read is an error naming it, not a
        corpus silently read in part (every byte range of a file shrunk mid-run would read "to the end").
        """
        if src.fmt == "parquet":
            yield from self._read_parquet(src, start, end)
            return
        if (start or end is not None) and not src.splittable:
            raise ValueError(f"{src.path} cannot be read by byte range")
        try:
            raw = open(src.path, "rb")
        except OSError as exc:
            raise _read_failure(src, exc) from None
        with raw:
            check_unchanged(src, os.fstat(raw.fileno()))
            try:
                fh = _decompressed(src, raw)
                yield from self._read_lines(src, fh, start, end)
            except (OSError, EOFError, zlib.error) as exc:
                check_unchanged(src, os.fstat(raw.fileno()))  # a file cut short mid-read: say so, not "corrupt"
                raise _read_failure(src, exc) from None
            except Exception as exc:  # zstandard raises its own ZstdError
                if type(exc).__name__ == "ZstdError":
                    check_unchanged(src, os.fstat(raw.fileno()))
                    raise UserError(f"{src.path}: corrupt or truncated zstd stream ({exc})") from None
                raise
            check_unchanged(src, os.fstat(raw.fileno()))
        check_unchanged(src)  # replaced under its name (a new file renamed over it)

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
        check_unchanged(src)
        try:
            if src.compression:
                # Parquet needs random access to its footer: decompress to a temporary file first.
                import tempfile

                tmp = tempfile.NamedTemporaryFile(suffix=".parquet", delete=False)
                with open_binary(src) as fh:
                    while chunk := fh.read(1 << 20):
                        tmp.write(chunk)
                tmp.close()
                pf = pq.ParquetFile(tmp.name)
            else:
                pf = pq.ParquetFile(src.path)
        except Exception as exc:
            if tmp is not None:
                os.unlink(tmp.name)
            if isinstance(exc, OSError) and exc.errno is not None:
                raise _read_failure(src, exc) from None
            check_unchanged(src)
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
            check_unchanged(src)
        finally:
            if tmp is not None:
                os.unlink(tmp.name)

