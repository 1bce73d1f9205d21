"""Peak memory of `cllama tokenizer train` against corpus size: it must follow the sample, not the corpus.

    CLLAMA_FIXTURES=../shared/fixtures python3 bench/tokenizer_train_memory.py --sizes-mb 50 400

Builds corpora of the given sizes by repeating the fixture corpus (or the shipped one), trains a
20,000-piece model on each with the same sample size, and prints peak RSS and time per size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import commit, repeat_to_size


def build_corpus(src: Path, out: Path, mb: int) -> Path:
    return repeat_to_size(src.read_bytes(), out, mb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[50, 400])
    ap.add_argument("--sample-sentences", type=int, default=200_000)
    ap.add_argument("--vocab-size", type=int, default=20_000)
    ap.add_argument("--work", default="bench/out/tokenizer_memory")
    args = ap.parse_args()
    fx = os.environ.get("CLLAMA_FIXTURES", "../shared/fixtures")
    src = Path(fx, "zh_open_mix.jsonl")
    if not src.is_file():
        from cllama_dist.assets import corpus_path

        src = corpus_path()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for mb in args.sizes_mb:
        corpus = build_corpus(src, work / f"corpus_{mb}mb.jsonl", mb)
        t0 = time.time()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        # One child per size, so each peak is its own (ru_maxrss of children is the max over them).
        cmd = [sys.executable, "-c",
               "import resource,sys; from cllama_dist.cli import main; rc=main(sys.argv[1:]); "
               "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)",
               "tokenizer", "train", "--corpus", str(corpus), "--out", str(work / f"zh_{mb}"),
               "--vocab-size", str(args.vocab_size), "--sample-sentences", str(args.sample_sentences)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        peak_kb = int(out.split("PEAK_KB")[1].split()[0])
        report = json.loads((work / f"zh_{mb}.report.json").read_text())
        results.append({"corpus_mb": round(corpus.stat().st_size / 1e6, 1), "peak_rss_mb": round(peak_kb / 1024, 1),
                        "seconds": round(time.time() - t0, 1), "sentences_seen": report["sentences_seen"],
                        "sentences_sampled": report["sentences_sampled"],
                        "seconds_sampling": report["seconds_sampling"], "seconds_training": report["seconds_training"]})
        print(json.dumps(results[-1]), flush=True)
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"commit {commit()}; {time.strftime('%Y-%m-%d')}")
    print("| corpus MB | sentences seen | sampled | peak RSS MB | sampling s | training s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['corpus_mb']} | {r['sentences_seen']:,} | {r['sentences_sampled']:,} | {r['peak_rss_mb']} | "
              f"{r['seconds_sampling']} | {r['seconds_training']} |")


if __name__ == "__main__":
    main()
