"""Offline preprocessing of instruction data: records -> chat template -> token ids + loss mask -> Arrow shards.

    cllama preprocess-sft --inputs data/alpaca_zh.json --tokenizer out/merged --template alpaca --output sft/
    cllama preprocess-sft ... --layout packed --max-length 1024 --num-tasks 8 --task-id 3   # one array task
    cllama preprocess-sft finalize --output sft/                                          # after all tasks

This is the instruction-tuning kind (``Instruction``) of the machinery both preprocessors share (data/pipeline,
whose docstring explains the contract): the plan of chunks and groups comes from the inputs and settings
alone, so 1 or 8 workers and 1 or 3 tasks give byte-identical shards; outputs never touch inputs and only a
folder of this kind ("sft-shards") is ever replaced; one writer per output (the folder's plan lock, a lock per
task, finalize's lock); a group's record, written last, commits it, so a re-run resumes; a full disk removes
the partial files and says so.

What is particular here:

- **Inputs**: Alpaca-style records (JSON Lines or one JSON array) and chat records (JSON Lines), read by
  cllama_dist.sft.records. JSON Lines files that are not compressed are cut into byte ranges (a record
  belongs to the range holding its first byte); a JSON array or a compressed file is one chunk. Each input
  is looked at when planning: a file that is not JSON, or whose first records are of neither format, is
  refused, naming it and its fields, instead of being read as thousands of skipped records (data/sft_inputs.py).
- **Examples**: each record is rendered through the chat template and encoded segment by segment
  (cllama_dist.sft.encode: the paper's token stream, loss mask on the responses and their EOS, every
  assistant turn), then truncated to ``max_length`` or skipped (``overflow``).
- **Split**: a record goes to validation when the keyed blake2b hash of its messages (canonical JSON, the
  record's own system text included, ``--system`` not) falls below ``validation_fraction``: the same record
  lands in the same split whatever the file order, workers or tasks; duplicates land together.
- **Rows** (layouts): ``padded``, one example per row padded to ``max_length`` (the paper's); ``packed``,
  greedy in input order, as many whole examples per row as fit, never split (the same rows as
  cllama_dist.sft.pack.pack_examples), continuously through a group; a group's last row is padded, so no row
  spans two groups and there is no tail shard. Padding is ``pad_id`` (the tokenizer's pad piece, else UNK:
  no new vocabulary row), with loss_mask 0; ``n_tokens`` says where it starts, ``example_starts`` where each
  example does, so that the trainer masks attention across examples and resets positions (loader.SFTBlocks).
- **Bad records** are counted by reason (records.SKIP_REASONS, "unrenderable" for a record the template
  refuses, encode's too_long / prompt_too_long), with the file:line where each reason first occurred; with
  ``strict`` the first one is an error naming file and line.

The shard format and manifest are described in data/shards/format.py ("instruction-tuning shards") and in
``build_sft_manifest``. This module must not import torch.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from .. import __version__, files
from ..errors import UserError
from ..sft import encode as enc
from ..sft import records as rec
from ..sft import templates as tpl
from ..sft.pack import default_pad_id
from ..tokenizer import spm as spmio
from . import pipeline
from .config import SFTPreprocessConfig
from .corpus import Source
from .encoder import SentencePieceEncoder
from .pipeline import SPLITS, Work, shard_path, spill_write, split_of
from .sft_inputs import (SKIP_REASONS, UNRENDERABLE, ChunkCounts, conversations, instruction_sources, line_of,
                         record_key)
from .shards.format import SFT_COLUMNS, SFT_FORMAT, dtype_for_vocab
from .shards.write import SFTShardWriter

KIND = "sft-shards"
# Planning estimate of output bytes per input byte: about 0.3 tokens per byte of instruction JSON, each token
# written as id + mask byte; padding adds more in the padded layout (x2 is typical of Alpaca-style data).
TOKENS_PER_INPUT_BYTE = 0.3
PADDED_EXPANSION = 2.0
FLUSH_TOKENS = 1 << 20  # spill the encoded examples of a chunk every this many tokens


# ------------------------------------------------------------------------------------------- inputs

def _tokenizer(path: str) -> Path:
    """The merged SentencePiece model file, or a one-line refusal saying what was given instead."""
    p = Path(path)
    hf = p / "tokenizer.json"
    if p.is_dir() and not (p / spmio.MODEL_FILE).is_file() and hf.is_file():
        raise UserError(f"tokenizer {p} holds a tokenizer.json but no {spmio.MODEL_FILE}: instruction data is "
                        "tokenized with the merged SentencePiece model (the folder `cllama tokenizer merge` wrote)")
    if p.is_file():
        try:
            with open(p, "rb") as f:
                head = f.read(64).lstrip()
        except OSError as exc:
            raise files.os_error(exc, p, "read") from None
        if head[:1] in (b"{", b"["):
            raise UserError(f"tokenizer {p} is a JSON file (a Hugging Face tokenizer.json?), not the merged "
                            "SentencePiece model: give the merged tokenizer folder (holding tokenizer.model) that "
                            "`cllama tokenizer merge` wrote")
    spmio.load_proto(p)
    return spmio.model_path(p)


def load_template(spec: str, tokenizer: str, sp) -> tpl.Template:
    """The template named by ``spec`` (templates.resolve), refused unless it is a chat template that renders a
    response: not a JSON file, using ``messages``, and rendering a plain user/assistant exchange with the
    assistant's text as target."""
    folder = tokenizer if os.path.isdir(tokenizer) else os.path.dirname(tokenizer) or "."
    if spec not in tpl.BUILTIN and spec != "tokenizer" and os.path.isfile(spec):
        try:
            json.loads(Path(spec).read_text(encoding="utf-8"))
            is_json = True
        except (ValueError, UnicodeDecodeError, OSError):
            is_json = False
        if is_json:
            raise UserError(f"chat template {spec} is a JSON file, not a Jinja template: give the template text as a "
                            ".jinja file (or --template tokenizer for a tokenizer folder's chat_template)")
    t = tpl.resolve(spec, folder)
    if not re.search(r"\bmessages\b", t.source):
        raise UserError(f"chat template {t.origin} never uses `messages`: not a Jinja chat template (one that "
                        "loops over messages and writes each role's content, as tokenizer chat_templates do)")
    probe = [{"role": "user", "content": "probe question"}, {"role": "assistant", "content": "probe answer"}]
    try:
        segments = t.segments(probe)
    except UserError as exc:
        raise UserError(f"chat template {t.origin} cannot render a plain user/assistant exchange: {exc}") from None
    target = "".join(s.text for s in segments if s.kind == tpl.TARGET)
    if "probe answer" not in target:
        raise UserError(f"chat template {t.origin} does not render the assistant's message as a response (it "
                        "renders no text for it, or renders it before the user's): there would be nothing to learn")
    enc.encode_conversation(probe, t, sp, 1 << 20)  # the tokenizer checks (BOS/EOS written as text, normalizer)
    return t

# --------------------------------------------------------------------------------------------- plan

def _settings(cfg: SFTPreprocessConfig, fp: dict, template: tpl.Template, pad_id: int) -> dict:
    """Everything that changes the bytes of the output (the template by name and sha256; its text is in the
    plan beside this)."""
    return {
        "format": SFT_FORMAT,
        "tokenizer": fp,
        "template": {"name": template.name, "sha256": template.sha256},
        "max_length": cfg.max_length,
        "layout": cfg.layout,
        "overflow": cfg.overflow,
        "pad_id": pad_id,
        "dtype": dtype_for_vocab(fp["vocab_size"]).name,
        "record_format": cfg.format,
        "instruction_field": cfg.instruction_field,
        "input_field": cfg.input_field,
        "output_field": cfg.output_field,
        "system_field": cfg.system_field,
        "messages_key": cfg.messages_key,
        "system": cfg.system,
        "validation_fraction": cfg.validation_fraction,
        "seed": cfg.seed,
        "strict": cfg.strict,
        "shard_size_mb": cfg.shard_size_mb,
        "chunk_mb": cfg.chunk_mb,
    }


def make_plan(cfg: SFTPreprocessConfig, sources: list[Source], fp: dict, template: tpl.Template,
              pad_id: int) -> dict:
    itemsize = dtype_for_vocab(fp["vocab_size"]).itemsize
    per_byte = TOKENS_PER_INPUT_BYTE * (itemsize + 1) * (PADDED_EXPANSION if cfg.layout == "padded" else 1.0)
    # a JSON array (fmt "json") is not splittable: one chunk
    return pipeline.make_plan(sources, _settings(cfg, fp, template, pad_id), chunk_mb=cfg.chunk_mb,
                              shard_size_mb=cfg.shard_size_mb, output_per_input_byte=per_byte,
                              template_source=template.source)


class Instruction:
    """The instruction-tuning kind (pipeline.Kind): records rendered through a chat template into rows of
    ``max_length`` tokens with a loss mask."""

    folder_kind = KIND
    command = "cllama preprocess-sft"
    label = "preprocess-sft"

    def plan(self, cfg: SFTPreprocessConfig) -> Work:
        """The tokenizer, template, sources and plan, every input checked before anything is written."""
        encoder = SentencePieceEncoder(_tokenizer(cfg.tokenizer))
        sp = encoder.processor
        template = load_template(cfg.template, cfg.tokenizer, sp)
        sources = instruction_sources(cfg)
        named = [p for p in cfg.inputs if os.path.exists(p)]
        template_file = [template.origin] if template.origin not in ("builtin", "string") else []
        files.check_not_input(cfg.output, {"instruction data": named + [s.path for s in sources],
                                           "tokenizer": [cfg.tokenizer, encoder.path], "chat template": template_file},
                              KIND)
        plan = make_plan(cfg, sources, encoder.fingerprint(), template, default_pad_id(sp))
        return Work(sources, plan, ExampleChunks(encoder, plan["settings"], template, sources))

    def group_writer(self, out: Path, plan: dict, group: int) -> "RowGroup":
        return RowGroup(out, plan["settings"], group)

    def manifest(self, out: Path, plan: dict, records: list[dict]) -> dict:
        return _manifest(plan, records)


INSTRUCTION = Instruction()


def prepare(cfg: SFTPreprocessConfig) -> dict:
    """Check everything and create the output folder with its plan, without tokenizing (before an array)."""
    return pipeline.prepare(INSTRUCTION, cfg)


def run_task(cfg: SFTPreprocessConfig) -> dict:
    """Encode this task's groups (all of them when num_tasks is 1), holding this task's lock."""
    return pipeline.run_task(INSTRUCTION, cfg)


def finalize(output: str, verify: bool = True) -> dict:
    """Check that every group is committed and write manifest.json (under the finalize lock, refused while a task
    still holds its lock)."""
    return pipeline.finalize(INSTRUCTION, output, verify)


def preprocess_sft(cfg: SFTPreprocessConfig) -> dict | None:
    """Run this task; finalize as well when it is the only task."""
    return pipeline.preprocess(INSTRUCTION, cfg)


# ------------------------------------------------------------------------------------------- worker

class ExampleChunks:
    """Renders and encodes chunks of instruction records (pipeline.ChunkEncoder): per split, the examples' ids
    (``.tok``), loss masks (``.mask``) and lengths (``.len``)."""

    def __init__(self, encoder: SentencePieceEncoder, settings: dict, template: tpl.Template, sources: list[Source]):
        self.encoder, self.settings, self.template, self.sources = encoder, settings, template, sources

    def start(self) -> None:
        self.encoder.load()

    def encode(self, index: int, chunk: list, base: Path) -> dict:
        """Read, render and encode one chunk; examples go to spill files per split (ids, mask, lengths)."""
        src_i, start, end = chunk
        sp, s, template, src = self.encoder.processor, self.settings, self.template, self.sources[src_i]
        dtype = np.dtype(s["dtype"])
        names = {split: {x: f"{base}.{split}.{x}" for x in ("tok", "mask", "len")} for split in SPLITS}
        try:
            spill = {split: {x: open(p, "wb") for x, p in names[split].items()} for split in SPLITS}
        except OSError as exc:
            raise files.os_error(exc, f"{base}.*", "create") from None
        counts = ChunkCounts()
        per_split = {split: {"examples": 0, "tokens": 0, "response_tokens": 0, "truncated": 0} for split in SPLITS}
        buf: dict[str, list] = {split: [[], [], []] for split in SPLITS}
        buffered = 0
        system = s["system"]

        def flush() -> None:
            nonlocal buffered
            for split in SPLITS:
                ids, mask, lens = buf[split]
                if not lens:
                    continue
                spill_write(spill[split]["tok"], np.fromiter((t for x in ids for t in x), dtype, sum(lens)))
                spill_write(spill[split]["mask"], np.fromiter((t for x in mask for t in x), np.uint8, sum(lens)))
                spill_write(spill[split]["len"], np.asarray(lens, np.int64))
                buf[split] = [[], [], []]
            buffered = 0

        done = False
        try:
            for conv, line, here in conversations(src, start, end, s, counts):
                split = SPLITS[split_of(record_key(conv), s["validation_fraction"], s["seed"])]
                if system is not None and conv.system is None:
                    conv = rec.Conversation(conv.turns, system, conv.where)
                try:
                    r = enc.encode_conversation(conv, template, sp, s["max_length"], overflow=s["overflow"])
                except UserError as exc:
                    _encode_skip(src, here, line, counts, s, UNRENDERABLE, f"the chat template cannot render it: {exc}")
                    continue
                if isinstance(r, enc.Skip):
                    what = (f"{r.length:,} tokens, more than max_length {s['max_length']:,} (overflow skip)"
                            if r.reason == "too_long" else
                            f"its prompt alone fills max_length {s['max_length']:,} ({r.length:,} tokens): no response left")
                    _encode_skip(src, here, line, counts, s, r.reason, what)
                    continue
                n = len(r.input_ids)
                b = buf[split]
                b[0].append(r.input_ids)
                b[1].append(r.loss_mask)
                b[2].append(n)
                c = per_split[split]
                c["examples"] += 1
                c["tokens"] += n
                c["response_tokens"] += sum(r.loss_mask)
                c["truncated"] += r.truncated
                buffered += n
                if buffered >= FLUSH_TOKENS:
                    flush()
            flush()
            done = True
        finally:
            for f in (f for d in spill.values() for f in d.values()):
                try:
                    f.close()
                except OSError as exc:
                    if done:
                        raise files.os_error(exc, f.name) from None
        return {"index": index, "base": str(base), "splits": per_split, "read": counts.read, "skipped": counts.skipped,
                "first": counts.first, "lines": counts.lines}


def _encode_skip(src: Source, here: int, line: int, counts: ChunkCounts, s: dict, reason: str, detail: str) -> None:
    if s["strict"]:
        at = line_of(src.path, here) if here >= 0 else line
        raise UserError(f"{src.path}:{at}: {detail} (drop --strict to skip and count such records)")
    counts.skip(reason, line)


# ------------------------------------------------------------------------------------------- rows

def assign_rows(lengths: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, offset in row) of each example, packed greedily in order and never split: an example goes into
    the current row when it fits, else starts the next (pack.pack_examples' rule)."""
    row = np.empty(len(lengths), np.int64)
    off = np.empty(len(lengths), np.int64)
    r = cur = 0
    for i, n in enumerate(lengths.tolist()):
        if n > block:
            raise ValueError(f"example {i} has {n} tokens, more than the row's {block}")
        if cur + n > block:
            r, cur = r + 1, 0
        row[i], off[i] = r, cur
        cur += n
    return row, off


class RowPacker:
    """Examples (a token stream with its mask and lengths) into rows of ``block`` tokens, written to ``writer``.

    ``packed``: greedy, carrying the examples of the row being filled from one ``feed`` to the next, so the
    rows are those of one pass over the whole stream; ``finish`` pads and writes the last. ``padded``: one
    example a row. Everything is vectorised but the greedy assignment (one step per example)."""

    def __init__(self, layout: str, block: int, pad_id: int, dtype: np.dtype, writer: SFTShardWriter):
        self.layout, self.block, self.pad_id, self.dtype, self.writer = layout, block, pad_id, np.dtype(dtype), writer
        self.carry = (np.zeros(0, self.dtype), np.zeros(0, np.uint8), np.zeros(0, np.int64))

    def feed(self, tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        if self.layout == "padded":
            self._write(tokens, mask, lengths, np.arange(len(lengths), dtype=np.int64), np.zeros(len(lengths), np.int64))
            return
        tok = np.concatenate([self.carry[0], tokens])
        msk = np.concatenate([self.carry[1], mask])
        lens = np.concatenate([self.carry[2], lengths])
        row, off = assign_rows(lens, self.block)
        last = int(row[-1])
        keep = row == last  # the row still being filled
        cut = int(lens[~keep].sum())
        self._write(tok[:cut], msk[:cut], lens[~keep], row[~keep], off[~keep])
        self.carry = (tok[cut:].copy(), msk[cut:].copy(), lens[keep].copy())

    def finish(self) -> None:
        tok, msk, lens = self.carry
        if len(lens):
            self._write(tok, msk, lens, np.zeros(len(lens), np.int64), np.concatenate([[0], np.cumsum(lens)[:-1]]))
        self.carry = (tok[:0], msk[:0], lens[:0])

    def _write(self, tok: np.ndarray, msk: np.ndarray, lens: np.ndarray, row: np.ndarray, off: np.ndarray) -> None:
        if not len(lens):
            return
        row = row - row[0]
        n_rows = int(row[-1]) + 1
        b = self.block
        stream_start = np.concatenate([[0], np.cumsum(lens)[:-1]])
        dest = np.repeat(row * b + off - stream_start, lens) + np.arange(int(lens.sum()))
        ids = np.full(n_rows * b, self.pad_id, self.dtype)
        mask = np.zeros(n_rows * b, np.uint8)
        ids[dest] = tok
        mask[dest] = msk
        n_tokens = np.bincount(row, weights=lens, minlength=n_rows).astype(np.int32)
        per_row = np.bincount(row, minlength=n_rows)
        self.writer.add(ids.reshape(n_rows, b), mask.reshape(n_rows, b), n_tokens, off, per_row)


class RowGroup:
    """One group's train and validation shards (pipeline.GroupWriter): the chunks' examples into rows."""

    def __init__(self, out: Path, s: dict, g: int):
        self.dtype, block = np.dtype(s["dtype"]), s["max_length"]
        self.writers = {sp: SFTShardWriter(shard_path(out, sp, g), block, self.dtype) for sp in SPLITS}
        self.packers = {sp: RowPacker(s["layout"], block, s["pad_id"], self.dtype, self.writers[sp]) for sp in SPLITS}
        self.counts = {sp: {"examples": 0, "tokens": 0, "response_tokens": 0, "truncated": 0} for sp in SPLITS}
        self.skipped = {r: 0 for r in SKIP_REASONS}
        self.first_skip: dict[str, list[int]] = {}
        self.lines: list[int] = []
        self.read = 0

    def add(self, chunk: int, r: dict) -> int:
        for split in SPLITS:
            base = f"{r['base']}.{split}"
            tok = np.fromfile(f"{base}.tok", dtype=self.dtype)
            msk = np.fromfile(f"{base}.mask", dtype=np.uint8)
            lens = np.fromfile(f"{base}.len", dtype=np.int64)
            self.packers[split].feed(tok, msk, lens)
            for k, v in r["splits"][split].items():
                self.counts[split][k] += v
            for x in ("tok", "mask", "len"):
                os.unlink(f"{base}.{x}")
        for reason, n in r["skipped"].items():
            self.skipped[reason] += n
        for reason, line in r["first"].items():
            self.first_skip.setdefault(reason, [chunk, line])
        self.lines.append(r["lines"])
        self.read += r["read"]
        return sum(v["tokens"] for v in r["splits"].values())

    def close(self) -> dict:
        shards = {}
        for split in SPLITS:
            self.packers[split].finish()
            if self.writers[split].rows:
                shards[split] = self.writers[split].close()
            else:
                self.writers[split].abort()
                shards[split] = None
        return {"shards": shards, "counts": self.counts, "read": self.read, "skipped": self.skipped,
                "first_skip": self.first_skip, "lines": self.lines}

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


# ------------------------------------------------------------------------------------------- finalize

def _manifest(plan: dict, records: list[dict]) -> dict:
    """manifest.json from the plan and the groups' records; the first line of each skip reason found back from
    each chunk's line count (a chunk of a JSON Lines file counts its lines from its own start)."""
    s = plan["settings"]
    lines = [n for r in records for n in r["lines"]]  # per chunk, in plan order
    before: list[int] = []  # lines of the same file before each chunk
    seen: dict[int, int] = {}
    for (src_i, _, _), n in zip(plan["chunks"], lines):
        before.append(seen.get(src_i, 0))
        seen[src_i] = seen.get(src_i, 0) + n
    first: dict[str, str] = {}
    for r in records:
        for reason, (c, line) in r["first_skip"].items():
            if reason not in first:
                first[reason] = f"{plan['inputs'][plan['chunks'][c][0]]['path']}:{before[c] + line}"
    splits = {}
    for split in SPLITS:
        info = {k: sum(r["counts"][split][k] for r in records) for k in ("examples", "tokens", "response_tokens",
                                                                         "truncated")}
        splits[split] = {"shards": [r["shards"][split] for r in records if r["shards"][split]], **info}
    skipped = {reason: sum(r["skipped"].get(reason, 0) for r in records) for reason in SKIP_REASONS}
    return build_sft_manifest(s, splits, template_source=plan["template_source"], inputs=plan["inputs"],
                              records=sum(r["read"] for r in records), skipped=skipped,
                              skipped_first={k: first[k] for k in SKIP_REASONS if k in first},
                              plan={"chunks": len(plan["chunks"]), "groups": len(plan["groups"])})


def build_sft_manifest(settings: dict, splits: dict, *, template_source: str, inputs: list[dict], records: int,
                       skipped: dict, skipped_first: dict, plan: dict) -> dict:
    """manifest.json of instruction-tuning shards, from the plan's settings and, per split, its shard records
    and counts ({"shards": [...], "examples", "tokens", "response_tokens", "truncated"})."""
    s = settings
    block = s["max_length"]
    full = {}
    for split, info in splits.items():
        shards = info["shards"]
        rows = sum(x["rows"] for x in shards)
        full[split] = {"shards": shards, "rows": rows, "examples": info["examples"], "tokens": info["tokens"],
                       "response_tokens": info["response_tokens"], "truncated": info["truncated"],
                       "padding_tokens": rows * block - info["tokens"]}
    total = {k: sum(v[k] for v in full.values()) for k in ("rows", "examples", "tokens", "response_tokens",
                                                            "truncated", "padding_tokens")}
    return {
        "format": SFT_FORMAT,
        "tool": f"cllama-dist {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": s["tokenizer"],
        "template": {"name": s["template"]["name"], "sha256": s["template"]["sha256"], "source": template_source},
        "max_length": block,
        "block_size": block,
        "layout": s["layout"],
        "overflow": s["overflow"],
        "pad_id": s["pad_id"],
        "dtype": s["dtype"],
        "columns": list(SFT_COLUMNS),
        "loss_mask": "1 on the response tokens of every assistant turn and their EOS; 0 on BOS, system, user and "
                     "template text, and on padding",
        "splits": full,
        "totals": {"records": records, **total, "skipped": sum(skipped.values())},
        "skipped": skipped,
        "skipped_first": skipped_first,
        "split": {"method": "blake2b-64 of the record's messages as compact JSON (UTF-8), keyed by seed; validation "
                            "if below validation_fraction * 2**64",
                  "validation_fraction": s["validation_fraction"], "seed": s["seed"]},
        "inputs": inputs,
        "plan": plan,
        "config": s,
    }


def summary(output: str, m: dict) -> str:
    """One line about a finished manifest, for the CLI."""
    t, v = m["splits"]["train"], m["splits"]["validation"]
    skipped = {k: c for k, c in m["skipped"].items() if c}
    line = (f"{m['totals']['records']:,} records -> {t['examples']:,} train + {v['examples']:,} validation examples "
            f"in {t['rows']:,} + {v['rows']:,} {m['layout']} rows of {m['block_size']} tokens "
            f"({m['totals']['response_tokens']:,} of {m['totals']['tokens']:,} tokens in responses, "
            f"{m['totals']['truncated']:,} truncated), template {m['template']['name']}; skipped: "
            f"{skipped or 'none'}; manifest: {Path(output) / 'manifest.json'}")
    if skipped:
        line += "\n" + "\n".join(f"note: first {k}: {w}" for k, w in m.get("skipped_first", {}).items())
    if not t["examples"]:
        print(f"warning: {output}: the train split holds no examples", file=sys.stderr)
    return line
