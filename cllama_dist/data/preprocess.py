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
- **Resume**: shards are written under ``.tmp`` names and renamed when complete; the group's record,
  written last (atomically), is the commit point. Re-running the same command skips committed groups
  and redoes the rest: nothing is duplicated, nothing lost.

This module must not import torch: it runs on CPU nodes and must start fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .. import __version__
from .config import PreprocessConfig
from ..errors import UserError
from ..progress import Progress
from ..tokenizer import spm as spmio
from .corpus import RecordReader, Source, SkipCounter, resolve_inputs
from .shards import FORMAT, MANIFEST, ShardWriter, dtype_for_vocab, verify_shards

SPLITS = ("train", "validation")
PLAN = "plan.json"
GROUPS = ".groups"
SPILL = ".tmp"
# Planning estimate: about one token per 4 input bytes (Chinese ~0.23 tokens/byte, English ~0.25).
TOKENS_PER_INPUT_BYTE = 0.25
COMPRESSION_ESTIMATE = 3.0  # decompressed bytes per compressed byte, for planning only


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
    }


def make_plan(cfg: PreprocessConfig, sources: list[Source], fp: dict) -> dict:
    chunk_bytes = max(int(cfg.chunk_mb * 1e6), 1)
    itemsize = dtype_for_vocab(fp["vocab_size"]).itemsize
    chunks: list[list] = []  # [source index, start, end, estimated input bytes]
    for i, src in enumerate(sources):
        if src.splittable:
            for a in range(0, max(src.size, 1), chunk_bytes):
                chunks.append([i, a, min(a + chunk_bytes, src.size), min(chunk_bytes, src.size - a)])
        elif src.fmt == "parquet" and not src.compression:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(src.path).metadata
            start, acc = 0, 0
            for g in range(meta.num_row_groups):
                acc += meta.row_group(g).total_byte_size
                if acc >= chunk_bytes or g == meta.num_row_groups - 1:
                    chunks.append([i, start, g + 1, acc])
                    start, acc = g + 1, 0
            if meta.num_row_groups == 0:
                chunks.append([i, 0, 0, 0])
        else:
            chunks.append([i, 0, None, int(src.size * COMPRESSION_ESTIMATE)])
    target = cfg.shard_size_mb * 1e6
    groups: list[list[int]] = []
    first, est = 0, 0.0
    for c, chunk in enumerate(chunks):
        est += chunk[3] * TOKENS_PER_INPUT_BYTE * itemsize
        if est >= target or c == len(chunks) - 1:
            groups.append([first, c + 1])
            first, est = c + 1, 0.0
    return {
        "inputs": [{"path": s.path, "size": s.size, "format": s.fmt, "compression": s.compression} for s in sources],
        "chunks": [c[:3] for c in chunks],
        "groups": groups,
        "settings": _settings(cfg, fp),
    }


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
    files = {sp_: (open(f"{base}.{sp_}.tok", "wb"), open(f"{base}.{sp_}.len", "wb")) for sp_ in SPLITS}
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
            tok_f, len_f = files[split]
            flat.tofile(tok_f)
            lens.tofile(len_f)
            docs[k] += len(picked)
            tokens[k] += int(lens.sum())
        batch.clear()

    try:
        for doc in reader.read(src, start, end):
            batch.append(doc.text)
            if len(batch) >= batch_docs:
                flush()
        if batch:
            flush()
    finally:
        for tok_f, len_f in files.values():
            tok_f.close()
            len_f.close()
    return {"index": index, "documents": docs, "tokens": tokens, "characters": chars,
            "skipped": dict(reader.skipped), "base": str(base)}


# ------------------------------------------------------------------------------------------- packing

class Packer:
    """Packs a token stream into rows of exactly ``block`` tokens, keeping the remainder."""

    FEED = 1 << 23  # tokens per step, to bound memory on huge chunks

    def __init__(self, block: int, dtype: np.dtype, writer: ShardWriter | None, boundaries: bool):
        self.block, self.writer, self.boundaries = block, writer, boundaries
        self.carry = np.zeros(0, dtype=dtype)
        self.carry_starts = np.zeros(0, dtype=np.int64)

    def feed(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """``lengths`` are the lengths of the documents that make up ``tokens``, in order."""
        doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
        pos = 0
        while pos < len(tokens):
            piece = tokens[pos:pos + self.FEED]
            in_piece = doc_starts[(doc_starts >= pos) & (doc_starts < pos + len(piece))] - pos
            self._feed(piece, in_piece)
            pos += len(piece)

    def feed_with_starts(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        """Append tokens whose document starts (offsets into ``tokens``) are already known."""
        self._feed(tokens, starts)

    def _feed(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        stream = np.concatenate([self.carry, tokens])
        starts = np.concatenate([self.carry_starts, starts + len(self.carry)])
        n = len(stream) // self.block
        cut = n * self.block
        if n and self.writer is not None:
            rows = stream[:cut].reshape(n, self.block)
            row_starts = None
            if self.boundaries:
                full = starts[starts < cut]
                edges = np.searchsorted(full, np.arange(n + 1) * self.block)
                row_starts = [(full[edges[r]:edges[r + 1]] - r * self.block).tolist() for r in range(n)]
            self.writer.add(rows, row_starts)
        self.carry = stream[cut:].copy()
        self.carry_starts = starts[starts >= cut] - cut

    def remainder(self) -> dict:
        return {"tokens": self.carry.tolist(), "starts": self.carry_starts.tolist()}


# ------------------------------------------------------------------------------------------ the task

def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _group_record_path(out: Path, g: int) -> Path:
    return out / GROUPS / f"group-{g:06d}.json"


def _prepare_output(cfg: PreprocessConfig, plan: dict) -> Path:
    """Create the output folder, or check that an existing one was made with the same settings."""
    out = Path(cfg.output)
    existing = out / PLAN
    if existing.is_file():
        old = json.loads(existing.read_text())
        if old != plan:
            if cfg.overwrite:
                shutil.rmtree(out)
            else:
                raise UserError(f"output folder {out} was made with other settings: {_plan_diff(old, plan)}; "
                                "use another folder, or --overwrite to delete it")
    elif out.exists() and any(out.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(out)
        else:
            raise UserError(f"output folder {out} is not empty and holds no {PLAN}; use another folder or --overwrite")
    (out / GROUPS).mkdir(parents=True, exist_ok=True)
    (out / SPILL).mkdir(exist_ok=True)
    if not existing.is_file():
        _write_json(existing, plan)
    return out


def _plan_diff(old: dict, new: dict) -> str:
    a, b = old["settings"], new["settings"]
    diffs = []
    if a["tokenizer"]["sha256"] != b["tokenizer"]["sha256"]:
        diffs.append(f"tokenizer sha256 {a['tokenizer']['sha256'][:16]}... (vocab {a['tokenizer']['vocab_size']:,}) there, "
                     f"{b['tokenizer']['sha256'][:16]}... (vocab {b['tokenizer']['vocab_size']:,}) now")
    for k in a:
        if k != "tokenizer" and a[k] != b.get(k):
            diffs.append(f"{k} {a[k]!r} there, {b.get(k)!r} now")
    if old["inputs"] != new["inputs"]:
        diffs.append("the inputs differ (files or sizes)")
    return "; ".join(diffs) or "the plan differs"


def prepare(cfg: PreprocessConfig) -> dict:
    """Check everything and create the output folder with its plan, without tokenizing.

    Run once before submitting an array of tasks: the tasks then find the plan in place instead of
    racing to create it, and a wrong flag fails here instead of in every task.
    """
    cfg = resolve_task(cfg)
    fp = spmio.fingerprint(spmio.model_path(cfg.tokenizer))
    plan = make_plan(cfg, resolve_inputs(cfg.inputs), fp)
    _prepare_output(cfg, plan)
    return plan


def run_task(cfg: PreprocessConfig) -> dict:
    """Tokenize this task's groups (all of them when num_tasks is 1). Returns what it did."""
    cfg = resolve_task(cfg)
    model = spmio.model_path(cfg.tokenizer)
    fp = spmio.fingerprint(model)
    sources = resolve_inputs(cfg.inputs)
    plan = make_plan(cfg, sources, fp)
    out = _prepare_output(cfg, plan)
    settings = plan["settings"]
    dtype = np.dtype(settings["dtype"])
    mine = task_groups(len(plan["groups"]), cfg.num_tasks, cfg.task_id)
    pending = [g for g in mine if not _group_record_path(out, g).is_file()]
    # Anything half-written by a killed run of this task is redone from its group's start.
    for g in pending:
        for split in SPLITS:
            for p in (out / f"{split}-{g:06d}.arrow", out / f"{split}-{g:06d}.arrow.tmp"):
                p.unlink(missing_ok=True)
        for c in range(*plan["groups"][g]):
            for f in (out / SPILL).glob(f"chunk-{c:07d}.*"):
                f.unlink()
    work = [(c, plan["chunks"][c]) for g in pending for c in range(*plan["groups"][g])]
    total_bytes = sum(_chunk_bytes(ch, sources) for _, ch in work)
    workers = cfg.workers or os.cpu_count() or 1
    t0 = time.time()
    done_tokens = 0
    if work:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        init = (str(model), settings, sources, str(out / SPILL))
        with Progress(f"preprocess task {cfg.task_id}/{cfg.num_tasks}", total=total_bytes, unit="B") as bar:
            jobs = [(c, ch, cfg.batch_docs) for c, ch in work]
            if workers == 1:
                _init_worker(*init)
                done_tokens = _consume(out, plan, pending, map(_encode_chunk, jobs), dtype, cfg, sources, bar)
            else:
                with ctx.Pool(workers, initializer=_init_worker, initargs=init) as pool:
                    done_tokens = _consume(out, plan, pending, pool.imap(_encode_chunk, jobs), dtype, cfg, sources, bar)
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
        writers = {s: ShardWriter(out / f"{s}-{g:06d}.arrow", block, dtype, cfg.record_boundaries) for s in SPLITS}
        packers = {s: Packer(block, dtype, writers[s], cfg.record_boundaries) for s in SPLITS}
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
                    packers[s].feed(tok, lens)
                    docs[s] += r["documents"][k]
                    toks[s] += r["tokens"][k]
                    os.unlink(f"{base}.{s}.tok")
                    os.unlink(f"{base}.{s}.len")
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
    """Check that every group of the plan is committed, pack the remainders, write manifest.json."""
    out = Path(output)
    if not (out / PLAN).is_file():
        raise UserError(f"{out} holds no {PLAN}: run `cllama preprocess` (or its array tasks) first")
    plan = json.loads((out / PLAN).read_text())
    s = plan["settings"]
    n = len(plan["groups"])
    missing = [g for g in range(n) if not _group_record_path(out, g).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {n} groups are not finished (first missing: group {missing[0]}); "
                        "re-run the tasks that own them (the same command resumes), then finalize again")
    records = [json.loads(_group_record_path(out, g).read_text()) for g in range(n)]
    dtype = np.dtype(s["dtype"])
    block = s["block_size"]
    splits: dict = {}
    dropped = {}
    for split in SPLITS:
        shards = [r["shards"][split] for r in records if r["shards"][split]]
        tail_path = out / f"{split}-tail.arrow"
        writer = ShardWriter(tail_path, block, dtype, s["record_boundaries"])
        packer = Packer(block, dtype, writer, s["record_boundaries"])
        for r in records:
            rem = r["remainder"][split]
            if rem["tokens"]:
                packer.feed_with_starts(np.asarray(rem["tokens"], dtype=dtype), np.asarray(rem["starts"], dtype=np.int64))
        if writer.sequences:
            shards.append(writer.close())
        else:
            writer.abort()
            tail_path.unlink(missing_ok=True)
        dropped[split] = len(packer.carry)
        splits[split] = {
            "shards": shards,
            "sequences": sum(x["sequences"] for x in shards),
            "tokens": sum(x["tokens"] for x in shards),
            "documents": sum(r["documents"][split] for r in records),
            "document_tokens": sum(r["tokens"][split] for r in records),
            "dropped_tail_tokens": dropped[split],
        }
    skipped = SkipCounter()
    for r in records:
        skipped.update(r["skipped"])
    manifest = {
        "format": FORMAT,
        "tool": f"cllama-dist {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": s["tokenizer"],
        "block_size": block,
        "dtype": s["dtype"],
        "add_bos": s["add_bos"],
        "add_eos": s["add_eos"],
        "record_boundaries": s["record_boundaries"],
        "columns": ["input_ids"] + (["doc_starts"] if s["record_boundaries"] else []),
        "splits": splits,
        "totals": {"sequences": sum(v["sequences"] for v in splits.values()),
                   "tokens": sum(v["tokens"] for v in splits.values()),
                   "documents": sum(v["documents"] for v in splits.values()),
                   "characters": sum(r["characters"] for r in records)},
        "skipped": skipped.as_dict(),
        "remainder_policy": "each group's partial last sequence is packed into the -tail shard; only the final "
                            "remainder (< block_size tokens per split) is dropped",
        "split": {"method": "blake2b-64 of the document's UTF-8 text, keyed by seed; validation if below "
                            "validation_fraction * 2**64",
                  "validation_fraction": s["validation_fraction"], "seed": s["seed"]},
        "inputs": plan["inputs"],
        "plan": {"chunks": len(plan["chunks"]), "groups": n},
        "config": s,
    }
    verify_shards(out, manifest, checksums=verify)
    _write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / SPILL, ignore_errors=True)
    return manifest


def preprocess(cfg: PreprocessConfig) -> dict | None:
    """Run this task; finalize as well when it is the only task."""
    cfg = resolve_task(cfg)
    run_task(cfg)
    if cfg.num_tasks == 1:
        return finalize(cfg.output, verify=False)
    return None
