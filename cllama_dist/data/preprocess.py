"""Offline preprocessing: a corpus into packed, sharded Arrow files, in parallel, resumable.

    cllama preprocess --corpus data/zh/ --tokenizer out/merged --output shards/ --block-size 512
    cllama preprocess ... --num-tasks 8 --task-id 3        # one Slurm array task (defaults from SLURM_*)
    cllama preprocess finalize --output shards/            # after all tasks: join into manifest.json

How the work is cut, and why the output never depends on it:

- **Chunks**: plain .txt/.jsonl files are cut into byte ranges of ``chunk_mb`` (a record belongs to
  the range holding its first byte); Parquet files into runs of row groups; a compressed file is one
  chunk, streamed. A worker tokenizes one chunk at a time, ``batch_docs`` documents per SentencePiece
  call, spilling tokens to a temporary file, so its memory never depends on the chunk or corpus size.
- **Groups**: consecutive chunks whose estimated output reaches ``shard_size_mb`` form a group; each
  group becomes one train shard and one validation shard. Documents are packed into sequences of
  exactly ``block_size`` tokens across document boundaries, continuously through the group.
- **Tasks** take contiguous runs of groups. The plan (chunks and groups) is computed from the inputs
  and settings alone, so 1 or 8 workers, 1 or 3 tasks, give byte-identical shards.
- **Remainders**: each group's last partial sequence (< block_size tokens per split) is kept in the
  group's record; ``finalize`` concatenates them in group order and packs them into a ``-tail`` shard.
  Only the corpus's final remainder (< block_size tokens per split) is dropped, and counted.
- **Resume**: shards are written under ``.tmp`` names, synced and renamed when complete; the group's
  record, written last (atomically), is the commit point. Re-running the same command skips committed
  groups (whose shards still have their recorded sizes) and redoes the rest: nothing is duplicated,
  nothing lost. A failure (a full disk) removes the partial files of uncommitted groups and keeps the rest.
- **Inputs**: the plan records each input's real path, size, modification time and a content sample; a
  resume over changed inputs is refused naming the file (``--overwrite`` redoes it), and a file that
  changes while it is read is an error. The output may not be, hold or lie inside an input, and
  ``--overwrite`` replaces only a folder this project made (``files.check_not_input``, ``claim_folder``;
  docs/hazards.md#h14).
- **Writers** (docs/hazards.md#h15): one per output. Checking or creating the plan happens under the folder's
  lock (held for moments; the tasks of an array take it in turn); each task then holds a lock of its own
  for its whole run, and is refused while a live task owning one of its groups holds one; finalize holds its
  own and refuses while any task's is live. Each refusal names the holder.

This module must not import torch: it runs on CPU nodes and must start fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .. import __version__, files
from .config import PreprocessConfig
from ..errors import UserError
from ..files import Lock
from ..progress import Progress
from ..tokenizer import spm as spmio
from .corpus import RecordReader, Source, SkipCounter, content_sample, resolve_inputs
from .shards import FORMAT, FORMAT_V1, MANIFEST, SIZE_COLUMNS, ShardWriter, dtype_for_vocab, verify_shards

SPLITS = ("train", "validation")
PLAN = "plan.json"
GROUPS = ".groups"
SPILL = ".tmp"
KIND = "shards"  # the output folder's kind (files.claim_folder)
# Locks (files.Lock): the folder's lock guards the plan (held for moments: checking, creating or replacing
# plan.json); a task holds its own for its whole run; finalize holds its own and refuses while a task's is live.
PLAN_LOCK = files.LOCK
TASK_LOCK = ".task-{task:06d}-of-{num:06d}.lock"
TASK_LOCK_RE = re.compile(r"\.task-(\d+)-of-(\d+)\.lock")
FINALIZE_LOCK = ".finalize.lock"
PLAN_LOCK_WAIT_S = 120.0  # the tasks of an array start together and take the plan lock in turn
# Planning estimate: about one token per 4 input bytes (Chinese ~0.23 tokens/byte, English ~0.25).
TOKENS_PER_INPUT_BYTE = 0.25
COMPRESSION_ESTIMATE = 3.0  # decompressed bytes per compressed byte, for planning only


@dataclasses.dataclass(frozen=True)
class Stage:
    """What tells the preprocessors apart in the machinery they share (plan, locks, tasks, finalize): the
    output folder's kind (``files.claim_folder``), the command that makes it (for messages) and the name its
    locks are held under. The instruction-tuning preprocessor (data/sft.py) is the other one."""

    kind: str
    command: str
    label: str


PRETRAIN = Stage(KIND, "cllama preprocess", "preprocess")


# ---------------------------------------------------------------------------------------------- plan

def _settings(cfg: PreprocessConfig, fp: dict) -> dict:
    """Everything that changes the bytes of the output."""
    return {
        "tokenizer": fp,
        "block_size": cfg.block_size,
        "dtype": dtype_for_vocab(fp["vocab_size"]).name,
        "add_bos": cfg.add_bos,
        "add_eos": cfg.add_eos,
        "validation_fraction": cfg.validation_fraction,
        "seed": cfg.seed,
        "text_field": cfg.text_field,
        "max_doc_chars": cfg.max_doc_chars,
        "strict": cfg.strict,
        "record_boundaries": cfg.record_boundaries,
        "shard_size_mb": cfg.shard_size_mb,
        "chunk_mb": cfg.chunk_mb,
        "format": FORMAT,  # a plan of an earlier format (no character counts in its spill) is not resumed
    }


def make_plan(cfg: PreprocessConfig, sources: list[Source], fp: dict) -> dict:
    itemsize = dtype_for_vocab(fp["vocab_size"]).itemsize
    chunks = plan_chunks(sources, cfg.chunk_mb)
    return {
        "inputs": [input_identity(s) for s in sources],
        "chunks": [c[:3] for c in chunks],
        "groups": plan_groups(chunks, cfg.shard_size_mb, TOKENS_PER_INPUT_BYTE * itemsize),
        "settings": _settings(cfg, fp),
    }


def plan_chunks(sources: list[Source], chunk_mb: float) -> list[list]:
    """Each source cut into chunks ``[source index, start, end, estimated input bytes]``, from the sources alone.

    A splittable file (``Source.splittable``: plain .txt / .jsonl) is cut into byte ranges of ``chunk_mb``; an
    uncompressed Parquet file into runs of row groups; anything else (compressed, or a JSON array, whose Source
    format data/sft.py sets to "json") is one chunk (end None), read whole.
    """
    chunk_bytes = max(int(chunk_mb * 1e6), 1)
    chunks: list[list] = []
    for i, src in enumerate(sources):
        if src.splittable:
            for a in range(0, max(src.size, 1), chunk_bytes):
                chunks.append([i, a, min(a + chunk_bytes, src.size), min(chunk_bytes, src.size - a)])
        elif src.fmt == "parquet" and not src.compression:
            meta = _parquet_metadata(src)
            start, acc = 0, 0
            for g in range(meta.num_row_groups):
                acc += meta.row_group(g).total_byte_size
                if acc >= chunk_bytes or g == meta.num_row_groups - 1:
                    chunks.append([i, start, g + 1, acc])
                    start, acc = g + 1, 0
            if meta.num_row_groups == 0:
                chunks.append([i, 0, 0, 0])
        else:
            chunks.append([i, 0, None, int(src.size * (COMPRESSION_ESTIMATE if src.compression else 1))])
    return chunks


def plan_groups(chunks: list[list], shard_size_mb: float, output_per_input_byte: float) -> list[list[int]]:
    """Consecutive chunks whose estimated output (input bytes x ``output_per_input_byte``) reaches
    ``shard_size_mb`` form a group ``[first chunk, end chunk)``: one train and one validation shard."""
    target = shard_size_mb * 1e6
    groups: list[list[int]] = []
    first, est = 0, 0.0
    for c, chunk in enumerate(chunks):
        est += chunk[3] * output_per_input_byte
        if est >= target or c == len(chunks) - 1:
            groups.append([first, c + 1])
            first, est = c + 1, 0.0
    return groups


def input_identity(src: Source) -> dict:
    """What identifies an input file in the plan: its real path, size, modification time (ns) and a sample of its
    content. A resume compares them, so an edited corpus (even one of the same size) is never silently mixed
    with shards made from its earlier content."""
    return {"path": src.path, "real": src.real or os.path.realpath(src.path), "size": src.size,
            "mtime_ns": src.mtime_ns, "sample": content_sample(src.path, src.size), "format": src.fmt,
            "compression": src.compression}


def _parquet_metadata(src: Source):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(src.path).metadata
    except OSError as exc:
        if exc.errno is not None:
            raise files.os_error(exc, src.path, "read") from None
        raise UserError(f"{src.path}: not a readable Parquet file ({exc})") from None
    except Exception as exc:
        raise UserError(f"{src.path}: not a readable Parquet file ({exc})") from None


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") and v.lstrip("-").isdigit() else default


def resolve_task(cfg: PreprocessConfig) -> PreprocessConfig:
    """num_tasks / task_id with Slurm's array variables as defaults (SLURM_ARRAY_TASK_COUNT, _ID - _MIN)."""
    num = cfg.num_tasks or _env_int("SLURM_ARRAY_TASK_COUNT", 1)
    task = cfg.task_id if cfg.task_id >= 0 else _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
    if not 0 <= task < num:
        raise UserError(f"task_id {task} is outside 0..{num - 1} (num_tasks {num})")
    return dataclasses.replace(cfg, num_tasks=num, task_id=task)


def task_groups(n_groups: int, num_tasks: int, task_id: int) -> range:
    return range(task_id * n_groups // num_tasks, (task_id + 1) * n_groups // num_tasks)


# -------------------------------------------------------------------------------------------- worker

_W: dict = {}


def _init_worker(model_file: str, settings: dict, sources: list[Source], spill: str) -> None:
    import sentencepiece as spm

    _W.update(sp=spm.SentencePieceProcessor(model_file=model_file), s=settings, sources=sources, spill=spill)


def split_of(text: str, fraction: float, seed: int) -> int:
    """0 (train) or 1 (validation), from a keyed hash of the document's text."""
    if fraction <= 0:
        return 0
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int(int.from_bytes(h.digest(), "little") < fraction * 2**64)


def _encode_chunk(args: tuple) -> dict:
    """Tokenize one chunk; tokens and document lengths go to spill files, per split."""
    index, (src_i, start, end), batch_docs = args
    sp, s, src = _W["sp"], _W["s"], _W["sources"][src_i]
    dtype = np.dtype(s["dtype"])
    reader = RecordReader(s["text_field"], s["strict"], s["max_doc_chars"])
    bos = [sp.bos_id()] if s["add_bos"] else []
    eos = [sp.eos_id()] if s["add_eos"] else []
    base = Path(_W["spill"]) / f"chunk-{index:07d}"
    try:
        spill = {sp_: (open(f"{base}.{sp_}.tok", "wb"), open(f"{base}.{sp_}.len", "wb"), open(f"{base}.{sp_}.sz", "wb"))
                 for sp_ in SPLITS}
    except OSError as exc:
        raise files.os_error(exc, f"{base}.*", "create") from None
    docs = [0, 0]
    tokens = [0, 0]
    chars = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal chars
        encoded = sp.encode(batch, num_threads=1)
        which = np.fromiter((split_of(t, s["validation_fraction"], s["seed"]) for t in batch), np.int8, len(batch))
        chars += sum(map(len, batch))
        for k, split in enumerate(SPLITS):
            picked = [ids for ids, w in zip(encoded, which) if w == k] if which.any() else (encoded if k == 0 else [])
            if not picked:
                continue
            texts = [t for t, w in zip(batch, which) if w == k] if which.any() else batch
            # characters and UTF-8 bytes of each document, for bits per character (Packer spreads them over its tokens)
            sizes = np.array([(len(t), len(t.encode("utf-8", "surrogatepass"))) for t in texts], np.int64)
            # One vectorised write per batch and split: BOS/EOS are inserted at the document edges.
            lens = np.fromiter(map(len, picked), np.int64, len(picked))
            flat = np.fromiter(itertools.chain.from_iterable(picked), dtype, int(lens.sum()))
            edges = np.concatenate([[0], np.cumsum(lens)[:-1]])
            if bos:
                flat = np.insert(flat, edges, bos[0])
                edges = edges + np.arange(len(edges))
            if eos:
                flat = np.insert(flat, edges + lens + (1 if bos else 0), eos[0])
            lens = lens + len(bos) + len(eos)
            tok_f, len_f, sz_f = spill[split]
            # file.write, not ndarray.tofile: tofile loses the errno of a failed write (a full disk).
            _spill_write(tok_f, flat)
            _spill_write(len_f, lens)
            _spill_write(sz_f, sizes)
            docs[k] += len(picked)
            tokens[k] += int(lens.sum())
        batch.clear()

    done = False
    try:
        for doc in reader.read(src, start, end):
            batch.append(doc.text)
            if len(batch) >= batch_docs:
                flush()
        if batch:
            flush()
        done = True
    finally:
        for f in itertools.chain.from_iterable(spill.values()):
            try:
                f.close()  # flushes the buffer: on a full disk, this is where the write fails
            except OSError as exc:
                if done:  # otherwise the error already on its way is the one to report
                    raise files.os_error(exc, f.name) from None
    return {"index": index, "documents": docs, "tokens": tokens, "characters": chars,
            "skipped": dict(reader.skipped), "base": str(base)}


def _spill_write(f, array: np.ndarray) -> None:
    try:
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
    except OSError as exc:
        raise files.os_error(exc, f.name) from None


# ------------------------------------------------------------------------------------------- packing

def token_sizes(lengths: np.ndarray, sizes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """(hi - lo, 2): the characters and UTF-8 bytes credited to tokens [lo, hi) of a stream of documents of
    ``lengths`` tokens and ``sizes`` (characters, bytes) each.

    A document of T tokens and C characters credits its token t with floor(C (t+1) / T) - floor(C t / T): whole
    numbers that add up to exactly C over the document, spread evenly, so a sequence (a slice of the stream)
    holds the text of its tokens to within one character per document edge, and a shard's sum is exact."""
    ends = np.cumsum(lengths)
    starts = ends - lengths
    x = np.arange(lo, hi + 1, dtype=np.int64)
    d = np.minimum(np.searchsorted(ends, x, side="right"), len(lengths) - 1)  # the document holding token x
    before = np.concatenate([np.zeros((1, 2), np.int64), np.cumsum(sizes, axis=0)])[d]  # sizes of documents before d
    t = np.minimum(x - starts[d], lengths[d])
    length = np.maximum(lengths[d], 1)[:, None]
    cum = before + sizes[d] * t[:, None] // length  # what tokens [0, x) hold
    cum[x >= ends[-1]] = sizes.sum(axis=0)  # the stream's end holds everything (empty documents at the end too)
    return np.diff(cum, axis=0)


class Packer:
    """Packs a token stream into rows of exactly ``block`` tokens, keeping the remainder.

    With ``sizes`` it also carries each token's share of its document's characters and UTF-8 bytes
    (``token_sizes``), and each row gets the sum of its tokens' (the n_chars / n_bytes columns)."""

    FEED = 1 << 23  # tokens per step, to bound memory on huge chunks

    def __init__(self, block: int, dtype: np.dtype, writer: ShardWriter | None, boundaries: bool, sizes: bool = False):
        self.block, self.writer, self.boundaries, self.sizes = block, writer, boundaries, sizes
        self.carry = np.zeros(0, dtype=dtype)
        self.carry_starts = np.zeros(0, dtype=np.int64)
        self.carry_sizes = np.zeros((0, 2), dtype=np.int64)

    def feed(self, tokens: np.ndarray, lengths: np.ndarray, sizes: np.ndarray | None = None) -> None:
        """``lengths`` are the lengths of the documents that make up ``tokens``, in order; ``sizes`` (n_docs, 2)
        their characters and UTF-8 bytes (needed when the packer records sizes)."""
        doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
        pos = 0
        while pos < len(tokens):
            piece = tokens[pos:pos + self.FEED]
            in_piece = doc_starts[(doc_starts >= pos) & (doc_starts < pos + len(piece))] - pos
            per_token = token_sizes(lengths, sizes, pos, pos + len(piece)) if self.sizes else None
            self._feed(piece, in_piece, per_token)
            pos += len(piece)

    def feed_with_starts(self, tokens: np.ndarray, starts: np.ndarray, per_token: np.ndarray | None = None) -> None:
        """Append tokens whose document starts (offsets into ``tokens``) and, with sizes, per-token characters
        and bytes (n, 2) are already known (a group's remainder)."""
        self._feed(tokens, starts, per_token)

    def _feed(self, tokens: np.ndarray, starts: np.ndarray, per_token: np.ndarray | None = None) -> None:
        stream = np.concatenate([self.carry, tokens])
        starts = np.concatenate([self.carry_starts, starts + len(self.carry)])
        sizes = np.concatenate([self.carry_sizes, per_token.reshape(-1, 2)]) if self.sizes else None
        n = len(stream) // self.block
        cut = n * self.block
        if n and self.writer is not None:
            rows = stream[:cut].reshape(n, self.block)
            row_starts = None
            if self.boundaries:
                full = starts[starts < cut]
                edges = np.searchsorted(full, np.arange(n + 1) * self.block)
                row_starts = [(full[edges[r]:edges[r + 1]] - r * self.block).tolist() for r in range(n)]
            row_sizes = sizes[:cut].reshape(n, self.block, 2).sum(axis=1) if self.sizes else None
            if self.sizes:
                self.writer.add(rows, row_starts, row_sizes)
            else:
                self.writer.add(rows, row_starts)
        self.carry = stream[cut:].copy()
        self.carry_starts = starts[starts >= cut] - cut
        if self.sizes:
            self.carry_sizes = sizes[cut:].copy()

    def remainder(self) -> dict:
        out = {"tokens": self.carry.tolist(), "starts": self.carry_starts.tolist()}
        if self.sizes:
            out["sizes"] = self.carry_sizes.tolist()
        return out


# ------------------------------------------------------------------------------------------ the task

def _write_json(path: Path, obj: dict) -> None:
    files.write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None
    except OSError as exc:
        raise files.os_error(exc, path, "read") from None


def _group_record_path(out: Path, g: int) -> Path:
    return out / GROUPS / f"group-{g:06d}.json"


# ------------------------------------------------------------------------------------------ inputs and locks

def _inputs_and_plan(cfg: PreprocessConfig) -> tuple[Path, list[Source], dict]:
    """The tokenizer, the sources and the plan, every input checked before anything is written."""
    spmio.load_proto(cfg.tokenizer)  # a tokenizer.json or any other file: said so now, not by SentencePiece later
    model = spmio.model_path(cfg.tokenizer)
    sources = resolve_inputs(cfg.inputs)
    named = [p for p in cfg.inputs if os.path.exists(p)]  # files and folders as given (globs are covered by sources)
    files.check_not_input(cfg.output, {"corpus": named + [s.path for s in sources],
                                       "tokenizer": [cfg.tokenizer, str(model)]}, KIND)
    fp = spmio.fingerprint(model)
    return model, sources, make_plan(cfg, sources, fp)


def _take(lock: Lock) -> Lock:
    try:
        lock.acquire()
    except OSError as exc:
        raise files.os_error(exc, lock.path, "create") from None
    note = lock.describe_takeover()
    if note:
        print(note, file=sys.stderr, flush=True)
    return lock


def _plan_lock(out: Path, stage: Stage = PRETRAIN) -> Lock:
    """The folder's lock, waited for: the tasks of an array start together and each holds it for moments."""
    if out.exists() and not out.is_dir():
        raise UserError(f"the {stage.kind} output {out} is a file, not a folder; choose a folder path")
    lock = Lock(out / PLAN_LOCK, f"{stage.label} (checking the plan)")
    deadline = time.monotonic() + PLAN_LOCK_WAIT_S
    vanished = 0
    while True:
        try:
            return _take(lock)
        except UserError:
            if not lock.path.exists():  # not held: the error was another (or the holder just left)
                vanished += 1
                if vanished > 3:
                    raise
                continue
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05 + 0.2 * random.random())


def _probe(path: Path, what: str) -> None:
    """Raise, naming the holder, if the lock at ``path`` is live; clear it if its holder is gone."""
    _take(Lock(path, what)).release()


def _live_locks_refuse(out: Path, action: str, finalize_too: bool = True, stage: Stage = PRETRAIN) -> None:
    """Refuse ``action`` while a task (or finalize) holds its lock in ``out``. Called under the plan lock."""
    names = sorted(p.name for p in out.glob(".task-*.lock") if TASK_LOCK_RE.fullmatch(p.name))
    if finalize_too and (out / FINALIZE_LOCK).exists():
        names.append(FINALIZE_LOCK)
    for name in names:
        try:
            _probe(out / name, stage.label)
        except UserError as exc:
            raise UserError(f"cannot {action} {out}: {exc}") from None


def _task_lock(out: Path, plan: dict, cfg, stage: Stage = PRETRAIN) -> Lock:
    """This task's lock, after making sure no live task of any split of the work owns one of its groups (a
    task of 3 and the single task of a plain run overlap). Called under the plan lock, so no task can start in
    between."""
    n = len(plan["groups"])
    mine = task_groups(n, cfg.num_tasks, cfg.task_id)
    name = TASK_LOCK.format(task=cfg.task_id, num=cfg.num_tasks)
    for p in sorted(out.glob(".task-*.lock")):
        m = TASK_LOCK_RE.fullmatch(p.name)
        if not m or p.name == name:
            continue
        theirs = task_groups(n, int(m[2]), int(m[1])) if int(m[1]) < int(m[2]) else range(0)
        if mine and theirs and mine.start < theirs.stop and theirs.start < mine.stop:
            _probe(p, stage.label)
    return _take(Lock(out / name, f"{stage.label} task {cfg.task_id} of {cfg.num_tasks}"))


def _open_output(cfg, plan: dict, hold_task: bool, stage: Stage = PRETRAIN) -> Lock | None:
    """Create the output folder with its plan, or check that an existing one has the same plan; then (with
    ``hold_task``) take this task's lock. Only a folder this project made is ever replaced (--overwrite), and
    never while another writer holds a lock in it.

    ``cfg``: any preprocessing config with ``output``, ``overwrite``, ``num_tasks`` and ``task_id``."""
    out = Path(cfg.output)
    plan_lock = _plan_lock(out, stage)
    try:
        existing = out / PLAN
        old = _read_json(existing) if existing.is_file() else None
        if existing.is_file() and old == plan:
            files.claim_folder(out, stage.kind, reuse=True)
        else:
            if existing.is_file() and not cfg.overwrite:
                raise UserError(_plan_refusal(out, old, plan))
            if cfg.overwrite:
                _live_locks_refuse(out, "replace", stage=stage)
            files.claim_folder(out, stage.kind, overwrite=cfg.overwrite)
            _write_json(existing, plan)
        try:
            (out / GROUPS).mkdir(exist_ok=True)
            (out / SPILL).mkdir(exist_ok=True)
        except OSError as exc:
            raise files.os_error(exc, out, "create") from None
        return _task_lock(out, plan, cfg, stage) if hold_task else None
    finally:
        plan_lock.release()


def _plan_refusal(out: Path, old: dict | None, new: dict) -> str:
    if old is None:
        return f"{out / PLAN} is unreadable (corrupt JSON); --overwrite replaces the folder"
    changes = _input_changes(old.get("inputs", []), new["inputs"])
    settings = _settings_diff(old, new)
    if changes and not settings:
        return (f"output folder {out} was made from other inputs: {'; '.join(changes)}; --overwrite redoes it "
                "from the files as they are now (or choose another folder)")
    return (f"output folder {out} was made with other settings: {'; '.join(settings + changes) or 'the plan differs'}; "
            "use another folder, or --overwrite to delete it")


def _input_changes(old: list[dict], new: list[dict]) -> list[str]:
    """Each input that differs between two plans, named, with what changed."""
    def key(i: dict) -> str:
        return i.get("real") or i["path"]

    a, b = {key(i): i for i in old}, {key(i): i for i in new}
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x is None:
            out.append(f"{y['path']} is new")
        elif y is None:
            out.append(f"{x['path']} is no longer an input")
        elif x != y:
            if "sample" not in x:
                out.append(f"{y['path']} was recorded by an earlier version (no modification time or content sample)")
                continue
            what = []
            if x["size"] != y["size"]:
                what.append(f"size {x['size']:,} -> {y['size']:,} bytes")
            if x["mtime_ns"] != y["mtime_ns"]:
                what.append(f"modified {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(x['mtime_ns'] / 1e9))} "
                            f"-> {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(y['mtime_ns'] / 1e9))}")
            if x["sample"] != y["sample"]:
                what.append("its content differs")
            if x["path"] != y["path"]:
                what.append(f"now named {y['path']}")
            out.append(f"{y['path']} changed ({', '.join(what) or 'format'})")
    if [key(i) for i in old] != [key(i) for i in new] and not out:
        out.append("the inputs are in another order")
    return out


def _settings_diff(old: dict, new: dict) -> list[str]:
    a, b = old.get("settings", {}), new["settings"]
    diffs = []
    if a.get("tokenizer", {}).get("sha256") != b["tokenizer"]["sha256"]:
        ta = a.get("tokenizer", {})
        diffs.append(f"tokenizer sha256 {str(ta.get('sha256'))[:16]}... (vocab {ta.get('vocab_size', 0):,}) there, "
                     f"{b['tokenizer']['sha256'][:16]}... (vocab {b['tokenizer']['vocab_size']:,}) now")
    for k in sorted(set(a) | set(b)):
        if k != "tokenizer" and a.get(k) != b.get(k):
            diffs.append(f"{k} {a.get(k)!r} there, {b.get(k)!r} now")
    if old.get("chunks") != new["chunks"] or old.get("groups") != new["groups"]:
        if not diffs and not _input_changes(old.get("inputs", []), new["inputs"]):
            diffs.append("the chunks or groups differ (a plan of another version?)")
    return diffs


def prepare(cfg: PreprocessConfig) -> dict:
    """Check everything and create the output folder with its plan, without tokenizing.

    Run once before submitting an array of tasks: a wrong flag fails here instead of in every task.
    """
    cfg = resolve_task(cfg)
    _, _, plan = _inputs_and_plan(cfg)
    _open_output(cfg, plan, hold_task=False)
    return plan


def run_task(cfg: PreprocessConfig) -> dict:
    """Tokenize this task's groups (all of them when num_tasks is 1), holding this task's lock. Returns what
    it did."""
    cfg = resolve_task(cfg)
    model, sources, plan = _inputs_and_plan(cfg)
    lock = _open_output(cfg, plan, hold_task=True)
    try:
        return _run_task(cfg, Path(cfg.output), model, sources, plan)
    finally:
        lock.release()  # type: ignore[union-attr]


def _committed_problem(out: Path, g: int) -> str | None:
    """Why group ``g``'s record cannot be trusted (its shard missing or of another size), or None."""
    rec = _read_json(_group_record_path(out, g))
    if rec is None:
        return "its record is unreadable"
    for split in SPLITS:
        shard = (rec.get("shards") or {}).get(split)
        if shard:
            p = out / shard["file"]
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                return f"its shard {p} is missing"
            if size != shard["bytes"]:
                return f"its shard {p} has {size:,} bytes, its record says {shard['bytes']:,}"
    return None


def _discard_uncommitted(out: Path, plan: dict, groups: list[int]) -> None:
    """Delete what the groups without a record left behind: partial shards and spill files."""
    for g in groups:
        if _group_record_path(out, g).is_file():
            continue
        for split in SPLITS:
            for p in (out / f"{split}-{g:06d}.arrow", out / f"{split}-{g:06d}.arrow.tmp"):
                p.unlink(missing_ok=True)
        for c in range(*plan["groups"][g]):
            for f in (out / SPILL).glob(f"chunk-{c:07d}.*"):
                f.unlink(missing_ok=True)


def _space_error(exc: BaseException) -> bool:
    """A full disk or quota (files.os_error words them so)."""
    return isinstance(exc, UserError) and any(w in str(exc) for w in (": disk full", ": disk quota exceeded"))


def _run_task(cfg: PreprocessConfig, out: Path, model: Path, sources: list[Source], plan: dict) -> dict:
    dtype = np.dtype(plan["settings"]["dtype"])

    def consume(pending: list[int], results: Iterator[dict], bar: Progress) -> int:
        return _consume(out, plan, pending, results, dtype, cfg, sources, bar)

    return run_groups(cfg, out, plan, sources, PRETRAIN, init=_init_worker,
                      initargs=(str(model), plan["settings"], sources, str(out / SPILL)),
                      encode=_encode_chunk, consume=consume, extra=cfg.batch_docs)


def run_groups(cfg, out: Path, plan: dict, sources: list[Source], stage: Stage, *, init: Callable,
               initargs: tuple, encode: Callable[[tuple], dict],
               consume: Callable[[list[int], Iterator[dict], Progress], int], extra=None) -> dict:
    """This task's groups (resolved ``cfg.num_tasks`` / ``cfg.task_id``): skip the committed ones, encode the
    chunks of the others in a pool of ``cfg.workers`` and hand the ordered results to ``consume``, which writes
    and commits group by group. ``encode((chunk index, chunk, extra))`` runs in the workers after
    ``init(*initargs)``. A failure removes the partial files of uncommitted groups; a full disk says so in one
    line. Shared by both preprocessors."""
    mine = task_groups(len(plan["groups"]), cfg.num_tasks, cfg.task_id)
    pending = []
    for g in mine:
        if _group_record_path(out, g).is_file():
            problem = _committed_problem(out, g)
            if problem is None:
                continue
            print(f"note: redoing group {g} of {out}: {problem}", file=sys.stderr, flush=True)
            _group_record_path(out, g).unlink()
        pending.append(g)
    # Anything half-written by a killed run of this task is redone from its group's start.
    _discard_uncommitted(out, plan, pending)
    work = [(c, plan["chunks"][c]) for g in pending for c in range(*plan["groups"][g])]
    total_bytes = sum(_chunk_bytes(ch, sources) for _, ch in work)
    workers = cfg.workers or os.cpu_count() or 1
    t0 = time.time()
    done_tokens = 0
    if work:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        try:
            with Progress(f"{stage.label} task {cfg.task_id}/{cfg.num_tasks}", total=total_bytes, unit="B") as bar:
                jobs = [(c, ch, extra) for c, ch in work]
                if workers == 1:
                    init(*initargs)
                    done_tokens = consume(pending, map(encode, jobs), bar)
                else:
                    with ctx.Pool(workers, initializer=init, initargs=initargs) as pool:
                        done_tokens = consume(pending, pool.imap(encode, jobs), bar)
        except BaseException as exc:
            # The workers are stopped (the pool is closed) before this runs: nothing writes any more.
            _discard_uncommitted(out, plan, pending)
            err = files.os_error(exc, getattr(exc, "filename", None) or out) if isinstance(exc, OSError) else exc
            if _space_error(err):
                kept = sum(_group_record_path(out, g).is_file() for g in mine)
                raise UserError(f"{err}; {kept} of this task's {len(mine)} groups are committed and kept, the partial "
                                "files removed: free some space and run the same command again to resume") from None
            if err is exc:
                raise
            raise err from None
    return {"task_id": cfg.task_id, "num_tasks": cfg.num_tasks, "groups": list(mine), "ran": pending,
            "tokens": done_tokens, "seconds": round(time.time() - t0, 2), "input_bytes": total_bytes}


def _chunk_bytes(chunk: list, sources: list[Source]) -> int:
    src = sources[chunk[0]]
    if src.splittable:
        return chunk[2] - chunk[1]
    return src.size if src.fmt != "parquet" or src.compression else 0


def _consume(out: Path, plan: dict, pending: list[int], results, dtype: np.dtype, cfg: PreprocessConfig,
             sources: list[Source], bar: Progress) -> int:
    """Pack the ordered chunk results group by group; commit each group with its record."""
    block = cfg.block_size
    total_tokens = 0
    it = iter(results)
    for g in pending:
        first, last = plan["groups"][g]
        writers = {s: ShardWriter(out / f"{s}-{g:06d}.arrow", block, dtype, cfg.record_boundaries, True) for s in SPLITS}
        packers = {s: Packer(block, dtype, writers[s], cfg.record_boundaries, True) for s in SPLITS}
        docs = {s: 0 for s in SPLITS}
        toks = {s: 0 for s in SPLITS}
        skipped = SkipCounter()
        chars = 0
        try:
            for _ in range(first, last):
                r = next(it)
                for k, s in enumerate(SPLITS):
                    base = r["base"]
                    tok = np.fromfile(f"{base}.{s}.tok", dtype=dtype)
                    lens = np.fromfile(f"{base}.{s}.len", dtype=np.int64)
                    sizes = np.fromfile(f"{base}.{s}.sz", dtype=np.int64).reshape(-1, 2)
                    packers[s].feed(tok, lens, sizes)
                    docs[s] += r["documents"][k]
                    toks[s] += r["tokens"][k]
                    os.unlink(f"{base}.{s}.tok")
                    os.unlink(f"{base}.{s}.len")
                    os.unlink(f"{base}.{s}.sz")
                skipped.update(r["skipped"])
                chars += r["characters"]
                total_tokens += sum(r["tokens"])
                bar.update(_chunk_bytes(plan["chunks"][r["index"]], sources), extra=f"{total_tokens / 1e6:.1f}M tokens")
            shards = {}
            for s in SPLITS:
                if writers[s].sequences:
                    shards[s] = writers[s].close()
                else:
                    writers[s].abort()
                    shards[s] = None
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        record = {"group": g, "chunks": [first, last], "shards": shards, "documents": docs, "tokens": toks,
                  "characters": chars, "skipped": skipped.as_dict(),
                  "remainder": {s: packers[s].remainder() for s in SPLITS}}
        _write_json(_group_record_path(out, g), record)
    return total_tokens


# ------------------------------------------------------------------------------------------ finalize

def finalize(output: str, verify: bool = True) -> dict:
    """Check that every group of the plan is committed, pack the remainders, write manifest.json.

    Holds the folder's finalize lock, and refuses while any task still holds its lock (naming the task and its
    holder): a task still writing would leave its group out of the manifest, or change it afterwards.
    """
    return finalize_groups(output, PRETRAIN, verify, _finalize)


def finalize_groups(output: str, stage: Stage, verify: bool, body: Callable[[Path, dict, list[dict]], dict]) -> dict:
    """The finalize both preprocessors share: under the finalize lock (refused while a task's is live), read the
    plan and every group's record (refusing a missing one, naming it), let ``body(out, plan, records)`` make the
    manifest, verify the shards against it (with ``verify``, their sha256 too), write it and drop the spill
    folder."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"the {stage.kind} output {out} is a file, not a folder")
    if not (out / PLAN).is_file():
        raise UserError(f"{out} holds no {PLAN}: run `{stage.command}` (or its array tasks) first")
    kind = files.folder_kind(out)
    if kind != stage.kind:
        other = {PRETRAIN.kind: PRETRAIN.command, "sft-shards": "cllama preprocess-sft"}.get(kind or "")
        raise UserError(f"{out} holds {kind or 'unmarked'} output, not {stage.kind}: "
                        + (f"finalize it with `{other} finalize`" if other else f"not made by `{stage.command}`"))
    plan_lock = _plan_lock(out, stage)
    try:
        _live_locks_refuse(out, "finalize", finalize_too=False, stage=stage)
        lock = _take(Lock(out / FINALIZE_LOCK, f"{stage.label} finalize"))
    finally:
        plan_lock.release()
    try:
        plan, records = _committed_records(out, stage)
        manifest = body(out, plan, records)
        verify_shards(out, manifest, checksums=verify)
        _write_json(out / MANIFEST, manifest)
        shutil.rmtree(out / SPILL, ignore_errors=True)
        return manifest
    finally:
        lock.release()


def _committed_records(out: Path, stage: Stage) -> tuple[dict, list[dict]]:
    plan = _read_json(out / PLAN)
    if plan is None:
        raise UserError(f"{out / PLAN} is unreadable (corrupt JSON): re-run `{stage.command}` with --overwrite")
    n = len(plan["groups"])
    missing = [g for g in range(n) if not _group_record_path(out, g).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {n} groups are not finished (first missing: group {missing[0]}); "
                        "re-run the tasks that own them (the same command resumes), then finalize again")
    records = []
    for g in range(n):
        r = _read_json(_group_record_path(out, g))
        if r is None:
            raise UserError(f"{_group_record_path(out, g)} is unreadable: delete it and re-run the task that owns "
                            f"group {g} (the same command redoes it)")
        records.append(r)
    return plan, records


def _finalize(out: Path, plan: dict, records: list[dict]) -> dict:
    s = plan["settings"]
    n = len(plan["groups"])
    dtype = np.dtype(s["dtype"])
    block = s["block_size"]
    splits: dict = {}
    for split in SPLITS:
        shards = [r["shards"][split] for r in records if r["shards"][split]]
        tail_path = out / f"{split}-tail.arrow"
        writer = ShardWriter(tail_path, block, dtype, s["record_boundaries"], True)
        packer = Packer(block, dtype, writer, s["record_boundaries"], True)
        try:
            for r in records:
                rem = r["remainder"][split]
                if rem["tokens"]:
                    packer.feed_with_starts(np.asarray(rem["tokens"], dtype=dtype),
                                            np.asarray(rem["starts"], dtype=np.int64),
                                            np.asarray(rem["sizes"], dtype=np.int64).reshape(-1, 2))
            if writer.sequences:
                shards.append(writer.close())
            else:
                writer.abort()
                tail_path.unlink(missing_ok=True)
        except BaseException:
            writer.abort()
            raise
        splits[split] = {
            "shards": shards,
            "documents": sum(r["documents"][split] for r in records),
            "document_tokens": sum(r["tokens"][split] for r in records),
            "dropped_tail_tokens": len(packer.carry),
            # the text of the dropped tail: with it, the shards' characters add up to the split's documents'
            "dropped_tail_characters": int(packer.carry_sizes[:, 0].sum()),
            "dropped_tail_utf8_bytes": int(packer.carry_sizes[:, 1].sum()),
        }
    skipped = SkipCounter()
    for r in records:
        skipped.update(r["skipped"])
    return build_manifest(s, splits, inputs=plan["inputs"], skipped=skipped.as_dict(),
                          characters=sum(r["characters"] for r in records),
                          plan={"chunks": len(plan["chunks"]), "groups": n})


def build_manifest(settings: dict, splits: dict, *, inputs: list[dict], skipped: dict, characters: int,
                   plan: dict) -> dict:
    """manifest.json from the plan's settings and, per split, its shard records ({"shards": [record, ...],
    "documents", "document_tokens", "dropped_tail_tokens"}). The one place a manifest is made (finalize, and
    the benchmarks' synthetic shard sets)."""
    s = settings
    # Shards written with their text sizes (as `cllama preprocess` writes them) make format /2; synthetic sets
    # written without (bench/loader_memory.py) stay /1, which the trainer reads without bits per character.
    records = [x for info in splits.values() for x in info["shards"]]
    sized = bool(records) and all("characters" in x for x in records)
    full = {}
    for split, info in splits.items():
        shards = info["shards"]
        full[split] = {"shards": shards,
                       "sequences": sum(x["sequences"] for x in shards),
                       "tokens": sum(x["tokens"] for x in shards),
                       "documents": info.get("documents", 0),
                       "document_tokens": info.get("document_tokens", sum(x["tokens"] for x in shards)),
                       "dropped_tail_tokens": info.get("dropped_tail_tokens", 0)}
        if sized:
            full[split].update(characters=sum(x["characters"] for x in shards),
                               utf8_bytes=sum(x["utf8_bytes"] for x in shards),
                               dropped_tail_characters=info.get("dropped_tail_characters", 0),
                               dropped_tail_utf8_bytes=info.get("dropped_tail_utf8_bytes", 0))
    return {
        "format": FORMAT if sized else FORMAT_V1,
        "tool": f"cllama-dist {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": s["tokenizer"],
        "block_size": s["block_size"],
        "dtype": s["dtype"],
        "add_bos": s["add_bos"],
        "add_eos": s["add_eos"],
        "record_boundaries": s["record_boundaries"],
        "columns": ["input_ids"] + (["doc_starts"] if s["record_boundaries"] else []) + (SIZE_COLUMNS if sized else []),
        "splits": full,
        "totals": {"sequences": sum(v["sequences"] for v in full.values()),
                   "tokens": sum(v["tokens"] for v in full.values()),
                   "documents": sum(v["documents"] for v in full.values()),
                   "characters": characters},
        "skipped": skipped,
        "remainder_policy": "each group's partial last sequence is packed into the -tail shard; only the final "
                            "remainder (< block_size tokens per split) is dropped",
        "split": {"method": "blake2b-64 of the document's UTF-8 text, keyed by seed; validation if below "
                            "validation_fraction * 2**64",
                  "validation_fraction": s["validation_fraction"], "seed": s["seed"]},
        "inputs": inputs,
        "plan": plan,
        "config": s,
    }


def preprocess(cfg: PreprocessConfig) -> dict | None:
    """Run this task; finalize as well when it is the only task."""
    cfg = resolve_task(cfg)
    run_task(cfg)
    if cfg.num_tasks == 1:
        return finalize(cfg.output, verify=False)
    return None
