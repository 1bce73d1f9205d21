"""Instruction data readers: Alpaca-style records and chat messages, into one Conversation.

Two formats, each as JSON Lines (one object a line) and, for Alpaca, also as one top-level JSON array
(the paper's data/alpaca_data_zh_51k.json); optionally .gz or .zst:

- Alpaca: ``{"instruction", "input", "output"}`` (field names configurable, plus an optional system
  field). A non-empty ``input`` is appended to the instruction after a newline, as the paper's
  build_dataset.py does (``instruction + '\\n' + input`` when input is neither None nor "").
- Chat: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``, an optional
  leading system message, then user / assistant alternating, ending with an assistant message.

JSON Lines files are streamed line by line and never loaded whole. A file whose first non-blank
character is "[" is one top-level JSON array, whatever its name; an array has no record boundaries
to stream by, so it is read into memory whole (then parsed element by element, so that errors still
name a line); convert a large one to JSON Lines.

Bad records are skipped and counted by reason (SKIP_REASONS), or with ``strict`` raise a UserError
naming file and line. An array whose JSON syntax is broken cannot be resynchronised and always raises.
Records too long for the model are a matter of the encoder (cllama_dist.sft.encode), not of reading.

An empty or whitespace-only system text reads as no system text (the template's default), because
datasets with a system column commonly leave it blank for most rows.
"""

from __future__ import annotations

import collections
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Literal

from ..data.corpus import Source, open_binary, classify
from ..errors import UserError

# Skip reasons, in the order reports list them.
SKIP_REASONS = (
    "invalid_utf8",      # bytes that are not UTF-8, or lone surrogates from \\ud800-style escapes
    "malformed_json",    # a line that is not JSON
    "malformed_record",  # JSON, but not an object / messages not a list of objects
    "missing_field",     # instruction / output / messages / role / content absent (or null)
    "non_string",        # a field that should be text is a number, list, ...
    "empty_prompt",      # nothing to instruct with (instruction and input both blank; blank user message)
    "empty_response",    # blank output / assistant message: nothing to learn
    "unknown_role",      # a role other than system / user / assistant
    "role_order",        # assistant first, two users in a row, ends with user, system not first, no turns
)


@dataclass(frozen=True)
class Fields:
    """Field names of Alpaca-style records. ``input`` and ``system`` may be absent from a record."""

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"
    system: str | None = None


@dataclass(frozen=True)
class Conversation:
    """A system text (None: the template's default) and (user, assistant) turns."""

    turns: tuple[tuple[str, str], ...]
    system: str | None = None
    where: str = field(default="", compare=False)  # "file:line" it was read from, for messages

    def messages(self) -> list[dict]:
        out = [] if self.system is None else [{"role": "system", "content": self.system}]
        for user, assistant in self.turns:
            out.append({"role": "user", "content": user})
            out.append({"role": "assistant", "content": assistant})
        return out


def single_turn(instruction: str, output: str, input: str | None = None, system: str | None = None) -> Conversation:
    """The paper's record as a Conversation: ``instruction + '\\n' + input`` when input is not empty."""
    user = instruction + "\n" + input if input is not None and input != "" else instruction
    return Conversation(((user, output),), system)


class ReadStats:
    """What the readers saw: records read and kept, skips by reason, and where each reason first occurred."""

    def __init__(self) -> None:
        self.read = 0
        self.kept = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.first: dict[str, str] = {}

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept,
                "skipped": {r: int(self.skipped.get(r, 0)) for r in SKIP_REASONS},
                "first": dict(self.first)}


class BadRecord(Exception):
    """A record to skip (or, strict, to refuse): the reason it is counted under (SKIP_REASONS) and a detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _text(value, name: str, *, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise BadRecord("missing_field", f"missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise BadRecord("non_string", f"field {name!r} is a {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")  # C speed; fails exactly on lone surrogates
    except UnicodeEncodeError:
        raise BadRecord("invalid_utf8", f"field {name!r} holds a lone surrogate (invalid UTF-8 or a \\ud8xx escape)") from None
    return value


def _system(value) -> str | None:
    s = _text(value, "system", required=False)
    return s if s and not s.isspace() else None


def alpaca_record(obj, fields: Fields = Fields()) -> Conversation:
    """One Alpaca-style object as a Conversation (raises BadRecord for a bad one)."""
    if not isinstance(obj, dict):
        raise BadRecord("malformed_record", f"a record must be a JSON object, not {type(obj).__name__}")
    instruction = _text(obj.get(fields.instruction), fields.instruction)
    output = _text(obj.get(fields.output), fields.output)
    inp = _text(obj.get(fields.input), fields.input, required=False) if fields.input else None
    system = _system(obj.get(fields.system)) if fields.system else None
    assert instruction is not None and output is not None
    if not instruction.strip() and not (inp or "").strip():
        raise BadRecord("empty_prompt", "instruction and input are both empty")
    if not output.strip():
        raise BadRecord("empty_response", f"field {fields.output!r} is empty")
    return single_turn(instruction, output, inp, system)


def chat_record(obj, messages_key: str = "messages") -> Conversation:
    """One chat object as a Conversation (raises BadRecord for a bad one)."""
    if not isinstance(obj, dict):
        raise BadRecord("malformed_record", f"a record must be a JSON object, not {type(obj).__name__}")
    msgs = obj.get(messages_key)
    if msgs is None:
        raise BadRecord("missing_field", f"missing field {messages_key!r}")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise BadRecord("malformed_record", f"{messages_key!r} must be a list of objects")
    roles, contents = [], []
    for i, m in enumerate(msgs, 1):
        if m.get("role") is None:
            raise BadRecord("missing_field", f"message {i} has no 'role'")
        role = m["role"]
        if role not in ("system", "user", "assistant"):
            raise BadRecord("unknown_role", f"message {i} has role {role!r} (expected system, user or assistant)")
        content = _text(m.get("content"), f"content of message {i}")
        roles.append(role)
        contents.append(content)
    system = None
    if roles and roles[0] == "system":
        system = contents[0] if contents[0] and not contents[0].isspace() else None
        roles, contents = roles[1:], contents[1:]
    if not roles:
        raise BadRecord("role_order", "no user / assistant messages")
    offset = len(msgs) - len(roles)
    for i, role in enumerate(roles):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            what = ("a system message after the first" if role == "system"
                    else "starts with an assistant message" if i == 0
                    else f"two {role} messages in a row")
            raise BadRecord("role_order", f"message {i + 1 + offset}: {what}")
    if roles[-1] != "assistant":
        raise BadRecord("role_order", "ends with a user message (no response to learn)")
    turns = []
    for i in range(0, len(roles), 2):
        user, assistant = contents[i], contents[i + 1]
        if not user.strip():
            raise BadRecord("empty_prompt", f"message {i + 1 + offset} (user) is empty")
        if not assistant.strip():
            raise BadRecord("empty_response", f"message {i + 2 + offset} (assistant) is empty")
        turns.append((user, assistant))
    return Conversation(tuple(turns), system)


# --------------------------------------------------------------------------------------------------
# Files.

def _source(path: str | os.PathLike) -> Source:
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise UserError(f"instruction file not found: {p}")
    kind = classify(p)
    compression = kind[1] if kind else ""
    return Source(os.path.abspath(p), "jsonl", compression, os.path.getsize(p))


def read_objects(path: str | os.PathLike, strict: bool, stats: ReadStats) -> Iterator[tuple[object, str]]:
    """(parsed object, "file:line") for each record of a JSON Lines file or top-level JSON array."""
    src = _source(path)
    try:
        with open_binary(src) as fh:
            first = fh.peek(64)[:64] if hasattr(fh, "peek") else b""
            if first.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"[":
                yield from _array(src.path, fh.read(), strict, stats)
                return
            for n, raw in enumerate(fh, 1):
                where = f"{src.path}:{n}"
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                if not raw.strip():
                    continue  # blank lines separate nothing and are not records
                stats.read += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    count_skip(stats, strict, "invalid_utf8", where, f"invalid UTF-8 ({exc.reason} at byte {exc.start})")
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    count_skip(stats, strict, "malformed_json", where, f"not JSON ({exc.msg} at column {exc.colno})")
                    continue
                yield obj, where
    except (OSError, EOFError) as exc:
        raise UserError(f"{src.path}: cannot read the file ({exc})") from None


def _array(path: str, data: bytes, strict: bool, stats: ReadStats) -> Iterator[tuple[object, str]]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad record is found and
    # skipped by _text instead of failing the whole file.
    text = data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    dec = json.JSONDecoder()
    ws = " \t\r\n"
    i = len(text) - len(text.lstrip(ws)) + 1  # past '['
    line, counted, n = 1, 0, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def broken(pos: int, what: str) -> UserError:
        return UserError(f"{path}:{line_at(pos)}: {what}; a JSON array cannot be read past a syntax error")

    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == "]" and n == 0:
            i += 1
            break
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise broken(i, f"malformed JSON ({exc.msg})") from None
        stats.read += 1
        n += 1
        yield obj, f"{path}:{line_at(i)}"
        i = end
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i < len(text) and text[i] == "]":
            i += 1
            break
        raise broken(i, "expected ',' or ']' after a record")
    if text[i:].strip(ws):
        raise broken(i, "text after the closing ']'")


def count_skip(stats: ReadStats, strict: bool, reason: str, where: str, detail: str) -> None:
    if strict:
        raise UserError(f"{where}: {detail} (drop strict to skip and count such records)")
    stats.skipped[reason] += 1
    stats.first.setdefault(reason, where)


def read_alpaca(path: str | os.PathLike, fields: Fields = Fields(), *, strict: bool = False,
                stats: ReadStats | None = None) -> Iterator[Conversation]:
    """Conversations of an Alpaca-style JSON Lines file or JSON array."""
    stats = stats if stats is not None else ReadStats()
    for obj, where in read_objects(path, strict, stats):
        try:
            conv = alpaca_record(obj, fields)
        except BadRecord as s:
            count_skip(stats, strict, s.reason, where, s.detail)
            continue
        stats.kept += 1
        yield Conversation(conv.turns, conv.system, where)


def read_chat(path: str | os.PathLike, *, messages_key: str = "messages", strict: bool = False,
              stats: ReadStats | None = None) -> Iterator[Conversation]:
    """Conversations of a chat JSON Lines file (or JSON array) of {"messages": [...]} records."""
    stats = stats if stats is not None else ReadStats()
    for obj, where in read_objects(path, strict, stats):
        try:
            conv = chat_record(obj, messages_key)
        except BadRecord as s:
            count_skip(stats, strict, s.reason, where, s.detail)
            continue
        stats.kept += 1
        yield Conversation(conv.turns, conv.system, where)


def read_conversations(path: str | os.PathLike, fmt: Literal["auto", "alpaca", "chat"] = "auto", *,
                       fields: Fields = Fields(), messages_key: str = "messages", strict: bool = False,
                       stats: ReadStats | None = None) -> Iterator[Conversation]:
    """Either format; "auto" decides per record: an object with ``messages_key`` is chat, else Alpaca."""
    if fmt == "alpaca":
        yield from read_alpaca(path, fields, strict=strict, stats=stats)
        return
    if fmt == "chat":
        yield from read_chat(path, messages_key=messages_key, strict=strict, stats=stats)
        return
    if fmt != "auto":
        raise UserError(f"unknown instruction format {fmt!r}: expected auto, alpaca or chat")
    stats = stats if stats is not None else ReadStats()
    for obj, where in read_objects(path, strict, stats):
        try:
            is_chat = isinstance(obj, dict) and messages_key in obj
            conv = chat_record(obj, messages_key) if is_chat else alpaca_record(obj, fields)
        except BadRecord as s:
            count_skip(stats, strict, s.reason, where, s.detail)
            continue
        stats.kept += 1
        yield Conversation(conv.turns, conv.system, where)
