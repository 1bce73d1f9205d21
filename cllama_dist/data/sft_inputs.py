"""Instruction data as `cllama preprocess-sft` reads it (data/sft.py): which files, each one's layout (looked at
when planning), and the good records of one chunk, the bad ones counted by reason with the line where each reason
first occurred (or, strict, an error naming file and line)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

from .. import files
from ..errors import UserError
from ..sft import encode as enc
from ..sft import records as rec
from .config import SFTPreprocessConfig
from .corpus import Source, check_unchanged, open_binary, resolve_inputs

UNRENDERABLE = "unrenderable"  # the template refused the record (raise_exception), or it holds U+E000
SKIP_REASONS = rec.SKIP_REASONS + (UNRENDERABLE,) + enc.ENCODE_SKIP_REASONS
SNIFF_BYTES = 1 << 20  # how much of each input the plan looks at to tell its format
SNIFF_RECORDS = 5      # refused only when none of its first records is of the format


def fields_of(s: dict) -> rec.Fields:
    return rec.Fields(instruction=s["instruction_field"], input=s["input_field"] or None, output=s["output_field"],
                      system=s["system_field"] or None)


def instruction_sources(cfg: SFTPreprocessConfig) -> list[Source]:
    if not cfg.inputs:
        raise UserError("no instruction data given: pass --inputs FILES (Alpaca-style .json / .jsonl, chat .jsonl)")
    sources = resolve_inputs(cfg.inputs)
    out = []
    for src in sources:
        if src.fmt != "jsonl":
            raise UserError(f"{src.path}: instruction data is JSON (Alpaca-style .json / .jsonl, chat .jsonl, "
                            f"optionally .gz / .zst), not {src.fmt}")
        out.append(dataclasses.replace(src, fmt="json") if sniff(src, cfg) == "array" else src)
    return out


def sniff(src: Source, cfg: SFTPreprocessConfig) -> str:
    """"array" or "lines", after checking that the file's first records are instruction records of the format."""
    try:
        with open_binary(src) as fh:
            data = fh.read(SNIFF_BYTES)
    except (OSError, EOFError) as exc:
        raise UserError(f"{src.path}: cannot read the file ({exc})") from None
    except Exception as exc:  # zstandard's own error
        raise UserError(f"{src.path}: cannot read the file, corrupt or truncated ({exc})") from None
    whole = len(data) < SNIFF_BYTES
    text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
    body = text.lstrip(" \t\r\n")
    if not body:
        raise UserError(f"{src.path}: the file is empty: no instruction records")
    objects: list[tuple[int, object]] = []
    if body[0] == "[":
        layout = "array"
        dec = json.JSONDecoder()
        i = len(text) - len(body) + 1
        while len(objects) < SNIFF_RECORDS:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text) or text[i] == "]":
                break
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError:
                break  # cut by the sample, or broken: the reader names the line
            objects.append((text.count("\n", 0, i) + 1, obj))
            i = end
    else:
        layout = "lines"
        lines = text.split("\n")
        if not whole:
            lines = lines[:-1]  # the sample may end inside a line
        parsed_any = False
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            parsed_any = True
            if isinstance(obj, dict):
                objects.append((n, obj))
            if len(objects) >= SNIFF_RECORDS:
                break
        if not parsed_any and any(line.strip() for line in lines):
            raise UserError(f"{src.path}: not instruction data: none of its first lines is JSON (expected JSON Lines "
                            "of Alpaca-style or chat records, or one JSON array of Alpaca-style records)")
    dicts = [(n, o) for n, o in objects if isinstance(o, dict)]
    if not dicts:
        return layout  # nothing to judge by in the sample: the reader counts or names what it finds
    a, m = (cfg.instruction_field, cfg.output_field), cfg.messages_key

    def fits(o: dict) -> bool:
        alpaca = any(k in o for k in a)
        return {"alpaca": alpaca, "chat": m in o, "auto": alpaca or m in o}[cfg.format]

    if not any(fits(o) for _, o in dicts):
        n, o = dicts[0]
        want = {"alpaca": f"an Alpaca-style record (fields {a[0]!r} / {a[1]!r})",
                "chat": f"a chat record (field {m!r})",
                "auto": f"an Alpaca-style record (fields {a[0]!r} / {a[1]!r}) nor a chat record (field {m!r})"}
        keys = ", ".join(map(repr, list(o)[:8])) or "none"
        head = f"{src.path}:{n}: {'neither' if cfg.format == 'auto' else 'not'} {want[cfg.format]}"
        raise UserError(f"{head}; its fields are {keys} (set --format, --instruction-field, --output-field or "
                        "--messages-key to read it)")
    return layout


class ChunkCounts:
    def __init__(self) -> None:
        self.read = 0
        self.skipped: dict[str, int] = {r: 0 for r in SKIP_REASONS}
        self.first: dict[str, int] = {}  # reason -> line, relative to the chunk's first line (1-based)
        self.lines = 0  # lines in the chunk (a byte range of a JSON Lines file; 0 for a file read whole)

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        self.first.setdefault(reason, line)


def line_of(path: str, offset: int) -> int:
    """The 1-based line holding byte ``offset`` (for an error message: reads the file up to there)."""
    n = 1
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            n += block.count(b"\n")
            left -= len(block)
    return n


def range_objects(src: Source, start: int, end: int, s: dict, counts: ChunkCounts) -> Iterator[tuple[object, int, int]]:
    """(parsed JSON, relative line, byte offset) of each record of the JSON Lines byte range [start, end), as
    records.read_objects reads a whole file: BOM on the first line dropped, blank lines no records, bad UTF-8 and
    bad JSON skipped (or, strict, an error naming file and line). Yields the line count at the end as
    (None, lines, -1)."""
    try:
        raw = open(src.path, "rb")
    except OSError as exc:
        raise files.os_error(exc, src.path, "read") from None
    with raw:
        check_unchanged(src, os.fstat(raw.fileno()))
        offset, line = 0, 0
        if start > 0:
            raw.seek(start - 1)
            offset = start - 1 + len(raw.readline())  # that line began in the previous range
        for data in raw:
            if offset >= end:
                break
            here = offset
            offset += len(data)
            line += 1
            if here == 0 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            if not data.strip():
                continue
            counts.read += 1
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                skip_bad(src, here, line, counts, s, "invalid_utf8", f"invalid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                skip_bad(src, here, line, counts, s, "malformed_json", f"not JSON ({exc.msg} at column {exc.colno})")
                continue
            yield obj, line, here
        check_unchanged(src, os.fstat(raw.fileno()))
    check_unchanged(src)
    yield None, line, -1


def skip_bad(src: Source, offset: int, line: int, counts: ChunkCounts, s: dict, reason: str, detail: str) -> None:
    if s["strict"]:
        raise UserError(f"{src.path}:{line_of(src.path, offset)}: {detail} (drop --strict to skip and count such "
                        "records)")
    counts.skip(reason, line)


def conversations(src: Source, start: int, end: int | None, s: dict,
                   counts: ChunkCounts) -> Iterator[tuple[rec.Conversation, int, int]]:
    """(conversation, relative line, byte offset or -1) of each good record of a chunk; bad ones counted."""
    fields, key, fmt = fields_of(s), s["messages_key"], s["record_format"]
    if end is None:  # a JSON array or a compressed file: records' own reader, whole
        stats = rec.ReadStats()
        check_unchanged(src)
        try:
            for conv in rec.read_conversations(src.path, fmt, fields=fields, messages_key=key, strict=s["strict"],
                                               stats=stats):
                yield conv, int(conv.where.rsplit(":", 1)[1]), -1
        except UserError as exc:
            msg = str(exc)
            raise UserError(msg.replace("(drop strict to", "(drop --strict to")) from None
        check_unchanged(src)
        counts.read += stats.read
        for reason, n in stats.skipped.items():
            counts.skipped[reason] += n
        for reason, where in stats.first.items():
            counts.first.setdefault(reason, int(where.rsplit(":", 1)[1]))
        return
    for obj, line, here in range_objects(src, start, end, s, counts):
        if obj is None:
            counts.lines = line
            return
        try:
            is_chat = fmt == "chat" or (fmt == "auto" and isinstance(obj, dict) and key in obj)
            conv = rec.chat_record(obj, key) if is_chat else rec.alpaca_record(obj, fields)
        except rec.BadRecord as skip:  # (records' per-record verdict: reason and detail)
            skip_bad(src, here, line, counts, s, skip.reason, skip.detail)
            continue
        yield conv, line, here


def record_key(conv: rec.Conversation) -> str:
    """What the split hash reads: the record's messages as canonical JSON."""
    return json.dumps(conv.messages(), ensure_ascii=False, separators=(",", ":"))
