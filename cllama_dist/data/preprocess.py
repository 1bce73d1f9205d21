"""Offline preprocessing for pre-training: a corpus into packed, sharded Arrow files, in parallel, resumable.

    cllama preprocess --corpus data/zh/ --tokenizer out/merged --output shards/ --block-size 512
    cllama preprocess ... --num-tasks 8 --task-id 3        # one Slurm array task (defaults from SLURM_*)
    cllama preprocess finalize --output shards/            # after all tasks: join into manifest.json

This is the pre-training kind of the shared machinery (data/pipeline: chunks, groups, tasks, locks, resume,
finalize; its docstring says what it guarantees). What is particular here:

- **Encoding**: a worker tokenizes its chunk ``batch_docs`` documents per tokenizer call (the kind's
  ``Encoder``, data/encoder.py), spilling tokens, document lengths and text sizes per split.
- **Split**: a document goes to validation when the keyed blake2b hash of its text falls below
  ``validation_fraction`` (``pipeline.split_of``).
- **Packing**: documents are packed into sequences of exactly ``block_size`` tokens across document
  boundaries, continuously through a group (``Packer``).
- **Remainders**: each group's last partial sequence (< block_size tokens per split) is kept in the
  group's record; ``finalize`` concatenates them in group order and packs them into a ``-tail`` shard.
  Only the corpus's final remainder (< block_size tokens per split) is dropped, and counted.

This module must not import torch: it runs on CPU nodes and must start fast.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__, files
from . import pipeline
from .config import PreprocessConfig
from .corpus import RecordReader, Source, SkipCounter, resolve_inputs
from .encoder import Encoder, open_encoder
from .pipeline import SPLITS, Work, make_plan, shard_path, spill_write, split_of
from .shards.format import FORMAT, FORMAT_V1, SIZE_COLUMNS, dtype_for_vocab
from .shards.write import ShardWriter

KIND = "shards"  # the output folder's kind (files.claim_folder)
# Planning estimate: about one token per 4 input bytes (Chinese ~0.23 tokens/byte, English ~0.25).
TOKENS_PER_INPUT_BYTE = 0.25


def plan_settings(cfg: PreprocessConfig, fp: dict) -> dict:
    """Everything that changes the bytes of the output (``fp``: the tokenizer's fingerprint)."""
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


class Pretraining:
    """The pre-training kind (pipeline.Kind): documents of text into packed sequences of ``block_size`` tokens.

    ``encoders``: the tokenizer given (``cfg.tokenizer``) -> its Encoder (default ``encoder.open_encoder``)."""

    folder_kind = KIND
    command = "cllama preprocess"
    label = "preprocess"

    def __init__(self, encoders: Callable[[str], Encoder] = open_encoder):
        self.encoders = encoders

    def plan(self, cfg: PreprocessConfig) -> Work:
        """The tokenizer, the sources and the plan, every input checked before anything is written."""
        encoder = self.encoders(cfg.tokenizer)
        sources = resolve_inputs(cfg.inputs)
        # files and folders as given (globs are covered by sources)
        named = [p for p in cfg.inputs if os.path.exists(p)]
        files.check_not_input(cfg.output, {"corpus": named + [s.path for s in sources],
                                           "tokenizer": [cfg.tokenizer, encoder.path]}, KIND)
        fp = encoder.fingerprint()
        itemsize = dtype_for_vocab(fp["vocab_size"]).itemsize
        plan = make_plan(sources, plan_settings(cfg, fp), chunk_mb=cfg.chunk_mb, shard_size_mb=cfg.shard_size_mb,
                         output_per_input_byte=TOKENS_PER_INPUT_BYTE * itemsize)
        return Work(sources, plan, TextChunks(encoder, plan["settings"], sources, cfg.batch_docs))

    def group_writer(self, out: Path, plan: dict, group: int) -> "PackedGroup":
        return PackedGroup(out, plan["settings"], group)

    def manifest(self, out: Path, plan: dict, records: list[dict]) -> dict:
        """Pack the groups' remainders into the -tail shards, then the manifest."""
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


PRETRAINING = Pretraining()


# -------------------------------------------------------------------------------------------- worker

class TextChunks:
    """Tokenizes chunks of text documents (pipeline.ChunkEncoder): per split, tokens with BOS/EOS at the document
    edges (``.tok``), document lengths (``.len``) and each document's characters and UTF-8 bytes (``.sz``)."""

    def __init__(self, encoder: Encoder, settings: dict, sources: list[Source], batch_docs: int):
        self.encoder, self.settings, self.sources, self.batch_docs = encoder, settings, sources, batch_docs

    def start(self) -> None:
        self.encoder.load()

    def encode(self, index: int, chunk: list, base: Path) -> dict:
        """Tokenize one chunk; tokens and document lengths go to spill files, per split."""
        src_i, start, end = chunk
        batch_docs = self.batch_docs
        s, src = self.settings, self.sources[src_i]
        dtype = np.dtype(s["dtype"])
        reader = RecordReader(s["text_field"], s["strict"], s["max_doc_chars"])
        bos = [self.encoder.bos_id] if s["add_bos"] else []
        eos = [self.encoder.eos_id] if s["add_eos"] else []
        try:
            spill = {name: tuple(open(f"{base}.{name}.{x}", "wb") for x in ("tok", "len", "sz")) for name in SPLITS}
        except OSError as exc:
            raise files.os_error(exc, f"{base}.*", "create") from None
        docs = [0, 0]
        tokens = [0, 0]
        chars = 0
        batch: list[str] = []

        def flush() -> None:
            nonlocal chars
            encoded = self.encoder.encode_batch(batch)
            which = np.fromiter((split_of(t, s["validation_fraction"], s["seed"]) for t in batch), np.int8,
                                len(batch))
            chars += sum(map(len, batch))
            for k, split in enumerate(SPLITS):
                picked = ([ids for ids, w in zip(encoded, which) if w == k] if which.any()
                          else (encoded if k == 0 else []))
                if not picked:
                    continue
                texts = [t for t, w in zip(batch, which) if w == k] if which.any() else batch
                # characters and UTF-8 bytes of each document, for bits per character (Packer spreads them over
                # its tokens)
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
                spill_write(tok_f, flat)
                spill_write(len_f, lens)
                spill_write(sz_f, sizes)
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


class PackedGroup:
    """One group's train and validation shards (pipeline.GroupWriter): the chunks' token streams packed."""

    def __init__(self, out: Path, s: dict, g: int):
        self.dtype, block, boundaries = np.dtype(s["dtype"]), s["block_size"], s["record_boundaries"]
        self.writers = {sp: ShardWriter(shard_path(out, sp, g), block, self.dtype, boundaries, True) for sp in SPLITS}
        self.packers = {sp: Packer(block, self.dtype, self.writers[sp], boundaries, True) for sp in SPLITS}
        self.docs = {sp: 0 for sp in SPLITS}
        self.toks = {sp: 0 for sp in SPLITS}
        self.skipped = SkipCounter()
        self.chars = 0

    def add(self, chunk: int, r: dict) -> int:
        for k, s in enumerate(SPLITS):
            base = r["base"]
            tok = np.fromfile(f"{base}.{s}.tok", dtype=self.dtype)
            lens = np.fromfile(f"{base}.{s}.len", dtype=np.int64)
            sizes = np.fromfile(f"{base}.{s}.sz", dtype=np.int64).reshape(-1, 2)
            self.packers[s].feed(tok, lens, sizes)
            self.docs[s] += r["documents"][k]
            self.toks[s] += r["tokens"][k]
            os.unlink(f"{base}.{s}.tok")
            os.unlink(f"{base}.{s}.len")
            os.unlink(f"{base}.{s}.sz")
        self.skipped.update(r["skipped"])
        self.chars += r["characters"]
        return sum(r["tokens"])

    def close(self) -> dict:
        shards = {}
        for s in SPLITS:
            if self.writers[s].sequences:
                shards[s] = self.writers[s].close()
            else:
                self.writers[s].abort()
                shards[s] = None
        return {"shards": shards, "documents": self.docs, "tokens": self.toks, "characters": self.chars,
                "skipped": self.skipped.as_dict(), "remainder": {s: self.packers[s].remainder() for s in SPLITS}}

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


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


# ------------------------------------------------------------------------------------------ manifest

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


# ------------------------------------------------------------------------------------------ commands

def prepare(cfg: PreprocessConfig) -> dict:
    """Check everything and create the output folder with its plan, without tokenizing (before an array)."""
    return pipeline.prepare(PRETRAINING, cfg)


def run_task(cfg: PreprocessConfig) -> dict:
    """Tokenize this task's groups (all of them when num_tasks is 1), holding this task's lock. Returns what
    it did."""
    return pipeline.run_task(PRETRAINING, cfg)


def finalize(output: str, verify: bool = True) -> dict:
    """Check that every group of the plan is committed, pack the remainders, write manifest.json (under the
    folder's finalize lock, refused while any task still holds its lock)."""
    return pipeline.finalize(PRETRAINING, output, verify)


def preprocess(cfg: PreprocessConfig) -> dict | None:
    """Run this task; finalize as well when it is the only task."""
    return pipeline.preprocess(PRETRAINING, cfg)
