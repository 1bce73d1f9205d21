"""Preprocessing throughput, side by side in one run: the paper's pipeline, the backend's bare batch encode
(the ceiling: SentencePiece's, or `tokenizers`' encode_batch for a byte-level BPE folder), and `cllama preprocess`,
on the same text and the same cores.

    CLLAMA_FIXTURES=../shared/fixtures python3 bench/preprocess.py --tokenizer TOKDIR --sizes-mb 50 400

TOKDIR is a merged tokenizer folder (e.g. `cllama tokenizer merge` of the fixtures: the paper's).
The corpus is the fixture corpus's paragraphs (one a line, .txt, as the paper's pipeline reads text),
repeated to each size. Every pipeline runs in its own process; peak memory is the largest summed RSS
of that process tree, sampled every 50 ms. The project's token stream is checked against a direct
SentencePiece encoding of the same documents (sha256 of both streams).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from itertools import chain
from pathlib import Path

import numpy as np

from common import commit, repeat_to_size

BLOCK = 512


def build_corpus(fixtures: Path, out: Path, mb: int) -> Path:
    lines = [p for l in (fixtures / "zh_open_mix.jsonl").read_text(encoding="utf-8").splitlines()
             for p in json.loads(l)["text"].split("\n") if p.strip()]
    return repeat_to_size(("\n".join(lines) + "\n").encode("utf-8"), out, mb)


# --- the three pipelines (each runs in a child process: `bench/preprocess.py --child NAME ...`) -----

def run_reference(corpus: str, tokenizer: str, work: str, cores: int) -> dict:
    """The paper's pipeline: datasets text loader, HF tokenizer .map, .map(group_texts), save_to_disk."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    raw = datasets.load_dataset("text", data_files={"train": corpus}, split="train", cache_dir=f"{work}/cache")
    tokenized = raw.map(lambda b: tok(b["text"]), batched=True, num_proc=cores, remove_columns=["text"])

    def group_texts(examples):
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = len(joined["input_ids"]) // BLOCK * BLOCK
        out = {k: [v[i:i + BLOCK] for i in range(0, total, BLOCK)] for k, v in joined.items()}
        out["labels"] = out["input_ids"].copy()
        return out

    grouped = tokenized.map(group_texts, batched=True, num_proc=cores)
    grouped.save_to_disk(f"{work}/reference_out")
    return {"sequences": len(grouped)}


def run_ceiling(corpus: str, tokenizer: str, work: str, cores: int) -> dict:
    """The backend's own batch encode on all cores (SentencePiece's, or `tokenizers`' encode_batch for a byte-level
    BPE folder); reading the text is not timed."""
    from cllama_dist.data.encoder import open_encoder
    from cllama_dist.data.pipeline import split_of
    from cllama_dist.data.shards import dtype_for_vocab

    encoder = open_encoder(tokenizer)
    fp = encoder.fingerprint()
    bos, dtype = fp["bos_id"], dtype_for_vocab(fp["vocab_size"])
    if fp.get("backend") == "bpe":
        os.environ["RAYON_NUM_THREADS"] = str(cores)
        tok = encoder.tokenizer

        def encode(batch):  # the call TokenizersEncoder makes
            return [e.ids for e in getattr(tok, "encode_batch_fast", tok.encode_batch)(batch, add_special_tokens=False)]
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(Path(tokenizer) / "tokenizer.model"))

        def encode(batch):
            return sp.encode(batch, num_threads=cores)
    lines = [l for l in Path(corpus).read_text(encoding="utf-8").split("\n") if l.strip()]
    # Batches of 20,000 lines: one call on 400 MB would hold 130M ids as Python ints and slow itself
    # down. Only the encode calls are timed; the equality-check hashing (BOS + ids of the train split,
    # in input order) is not.
    seconds, tokens, h = 0.0, 0, hashlib.sha256()
    for i in range(0, len(lines), 20_000):
        batch = lines[i:i + 20_000]
        t0 = time.time()
        ids = encode(batch)
        seconds += time.time() - t0
        tokens += sum(map(len, ids))
        for text, x in zip(batch, ids):
            if split_of(text, 0.01, 0) == 0:
                h.update(np.asarray([bos] + x, dtype=dtype).tobytes())
    return {"timed_seconds": seconds, "tokens": tokens, "train_stream_sha256": h.hexdigest()}


def run_ours(corpus: str, tokenizer: str, work: str, cores: int) -> dict:
    from cllama_dist.data.config import PreprocessConfig
    from cllama_dist.data.preprocess import preprocess

    out = Path(work) / "ours_out"
    shutil.rmtree(out, ignore_errors=True)
    m = preprocess(PreprocessConfig(inputs=[corpus], tokenizer=tokenizer, output=str(out), block_size=BLOCK,
                                    workers=cores, validation_fraction=0.01, seed=0))
    return {"tokens": m["splits"]["train"]["document_tokens"] + m["splits"]["validation"]["document_tokens"],
            "sequences": m["totals"]["sequences"]}


def ours_stream_sha256(work: Path) -> str:
    """Group shards + remainders, in order, rebuild the whole train stream. Run outside the measured
    process: memory-mapping every shard would count against the pipeline's peak memory."""
    from cllama_dist.data.pipeline import GROUPS
    from cllama_dist.data.shards import shard_tokens

    out = work / "ours_out"
    dtype = json.loads((out / "manifest.json").read_text())["dtype"]
    h = hashlib.sha256()
    for rec in sorted((out / GROUPS).glob("group-*.json")):
        r = json.loads(rec.read_text())
        if r["shards"]["train"]:
            h.update(shard_tokens(out / r["shards"]["train"]["file"]).tobytes())
        h.update(np.asarray(r["remainder"]["train"]["tokens"], dtype=dtype).tobytes())
    return h.hexdigest()


CHILDREN = {"reference": run_reference, "ceiling": run_ceiling, "ours": run_ours}


def measure(name: str, corpus: Path, tokenizer: str, work: Path, cores: int) -> dict:
    import psutil

    result_file = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--child", name, "--corpus", str(corpus), "--tokenizer", tokenizer,
           "--work", str(work), "--cores", str(cores), "--result", str(result_file)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    wall = time.time() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err.decode()[-3000:]}")
    r = json.loads(result_file.read_text())
    seconds = r.get("timed_seconds", wall)
    mb = corpus.stat().st_size / 1e6
    return {"pipeline": name, "corpus_mb": round(mb, 1), "seconds": round(seconds, 2), "mb_per_s": round(mb / seconds, 2),
            "tokens_per_s": round(r.get("tokens", 0) / seconds) if r.get("tokens") else None,
            "peak_rss_mb": round(peak / 1e6, 1), **{k: v for k, v in r.items() if k.endswith("sha256")}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", help="merged tokenizer folder")
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 400])
    ap.add_argument("--work", default="bench/out/preprocess")
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--child")
    ap.add_argument("--corpus")
    ap.add_argument("--result")
    args = ap.parse_args()
    if args.child:
        r = CHILDREN[args.child](args.corpus, args.tokenizer, args.work, args.cores)
        Path(args.result).write_text(json.dumps(r))
        return
    fixtures = Path(os.environ.get("CLLAMA_FIXTURES", "../shared/fixtures"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for mb in args.sizes_mb:
        corpus = build_corpus(fixtures, work / f"corpus_{mb}mb.txt", mb)
        shutil.rmtree(work / "cache", ignore_errors=True)
        shutil.rmtree(work / "reference_out", ignore_errors=True)
        res = {n: measure(n, corpus, args.tokenizer, work, args.cores) for n in ("reference", "ceiling", "ours")}
        ours = res["ours"]
        ours["train_stream_sha256"] = ours_stream_sha256(work)
        ours["x_reference"] = round(ours["mb_per_s"] / res["reference"]["mb_per_s"], 2)
        ours["share_of_ceiling"] = round(ours["mb_per_s"] / res["ceiling"]["mb_per_s"], 3)
        ours["stream_equals_sentencepiece"] = ours["train_stream_sha256"] == res["ceiling"]["train_stream_sha256"]
        for r in res.values():
            print(json.dumps(r), flush=True)
            rows.append(r)
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; cores used: {args.cores}; commit {commit()}; "
          f"{time.strftime('%Y-%m-%d')}; block size {BLOCK}")
    print("| corpus MB | pipeline | MB/s | tokens/s | peak RSS MB | vs reference | share of ceiling | stream = SentencePiece |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['corpus_mb']} | {r['pipeline']} | {r['mb_per_s']} | {r['tokens_per_s'] or ''} | {r['peak_rss_mb']} | "
              f"{r.get('x_reference', '')} | {r.get('share_of_ceiling', '')} | {r.get('stream_equals_sentencepiece', '')} |")
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
