"""Peak memory per rank of a short training run against the size of the shard set: it must not follow it.

    python3 bench/loader_memory.py --sizes-gb 0.2 2 --steps 10

The same run (the tiny LLaMA, ZeRO-3 on the CPU, 2 ranks under torchrun, ``--steps`` optimizer steps) on
synthetic shard sets of the given sizes. Each rank reports its own peak RSS (``ru_maxrss``) and, at exit, its
anonymous and file-backed RSS (/proc/self/status): the trainer's ``peak_memory_gib`` in metrics.jsonl is rank
0's only (metrics are written by rank 0), so this script is also the per-rank wrapper torchrun starts
(``--worker``), which runs the trainer and then writes its figures. Target: the peaks of every size within 10%
(or 100 MB) of each other; a loader that loads the shards adds the set's size to every rank.

Shards are written directly (random ids below the merged tokenizer's vocabulary, by the preprocessor's
ShardWriter, with a manifest from ``preprocess.build_manifest``, as finalize makes it): tokenizing GBs of text
would measure the tokenizer. The tokenizer is built as the tests' ``tiny_merged`` fixture builds it. What is
measured is the trainer as it is, including whatever shard verification it does at start-up (printed).

``--pythonpath DIR`` runs the ranks with another checkout's ``cllama_dist`` first on the path (a "before").
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

sys.path.append(str(Path(__file__).resolve().parents[1]))  # this checkout, after PYTHONPATH (see --pythonpath)

from common import commit

ROWS_BLOCK = 64  # default sequence length: the tests' runs (the tiny model has 256 positions)


# ------------------------------------------------------------------------------ the rank wrapper


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def worker(report_dir: Path, argv: list[str]) -> int:
    """One rank: the trainer, then this rank's memory figures into REPORT_DIR/rank-N.json."""
    from cllama_dist.train import main as train

    t0 = time.time()
    code = 1
    try:
        code = train(argv)
    finally:
        rank = int(os.environ.get("RANK", "0"))
        figures = {"rank": rank, "exit": code, "seconds": round(time.time() - t0, 1),
                   "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **_status()}
        (report_dir / f"rank-{rank}.json").write_text(json.dumps(figures))
    return code


# ------------------------------------------------------------------------------ fixtures, built once


def tokenizer_and_model(work: Path) -> tuple[Path, Path]:
    """The tests' tiny_merged tokenizer (base 1,000 BPE pieces + a 3,000-piece Chinese model) and tiny model."""
    from cllama_dist.assets import corpus_path
    from cllama_dist.model.presets import TINY
    from cllama_dist.tokenizer.base import build_base_tokenizer
    from cllama_dist.tokenizer.config import MergeConfig, TokenizerTrainConfig
    from cllama_dist.tokenizer.merge import merge
    from cllama_dist.tokenizer.train import train

    base, zh, tok, model = work / "base", work / "zh", work / "tok", work / "model"
    if not (tok / "tokenizer.model").is_file():
        build_base_tokenizer(base, vocab_size=1000)
        train(TokenizerTrainConfig(inputs=[str(corpus_path())], output=str(zh), vocab_size=3000, threads=2))
        merge(MergeConfig(base=str(base), add=str(zh) + ".model", out=str(tok)))
    if not (model / "config.json").is_file():
        import sentencepiece as spm
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        vocab = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model")).get_piece_size()
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY)).save_pretrained(model)
    return tok, model


def shard_set(folder: Path, gb: float, tokenizer: Path, shard_mb: float, block: int) -> dict:
    """A shard set of about ``gb`` GB of train shards (+1% validation), reused when already there."""
    import numpy as np

    from cllama_dist.data.config import PreprocessConfig
    from cllama_dist.data.preprocess import build_manifest, plan_settings
    from cllama_dist.data.shards import MANIFEST, ShardWriter, load_manifest
    from cllama_dist.files import claim_folder, write_atomic
    from cllama_dist.tokenizer.spm import fingerprint

    fp = fingerprint(tokenizer)
    cfg = PreprocessConfig(inputs=["synthetic"], tokenizer=str(tokenizer), output=str(folder), block_size=block,
                           shard_size_mb=shard_mb, validation_fraction=0.01)
    settings = plan_settings(cfg, fp)
    want = int(gb * 1e9)
    if (folder / MANIFEST).is_file():
        m = load_manifest(folder)
        have = sum(s["bytes"] for s in m["splits"]["train"]["shards"])
        if m["tokenizer"]["sha256"] == fp["sha256"] and m["block_size"] == block and abs(have - want) < 0.05 * want:
            return m
    claim_folder(folder, "shards", overwrite=True)
    dtype = np.dtype(settings["dtype"])
    row_bytes = block * dtype.itemsize
    rng = np.random.default_rng(0)
    splits = {}
    for split, total in (("train", want), ("validation", max(want // 100, row_bytes * 64))):
        rows_left, k, shards = total // row_bytes, 0, []
        while rows_left > 0:
            rows = min(rows_left, int(shard_mb * 1e6) // row_bytes)
            w = ShardWriter(folder / f"{split}-{k:06d}.arrow", block, dtype, False)
            for a in range(0, rows, 1 << 16):
                w.add(rng.integers(3, fp["vocab_size"], (min(1 << 16, rows - a), block), dtype=dtype))
            shards.append(w.close())
            rows_left -= rows
            k += 1
        splits[split] = {"shards": shards, "documents": 0, "document_tokens": sum(s["tokens"] for s in shards)}
    m = build_manifest(settings, splits, inputs=[], skipped={}, characters=0, plan={"synthetic": True})
    write_atomic(folder / MANIFEST, json.dumps(m, indent=1) + "\n")
    return m


def run_config(path: Path, model: Path, tok: Path, shards: Path, out: Path, steps: int) -> Path:
    """tests/integration/test_train.py's run, without checkpoints or validation inside the timed steps."""
    import yaml

    cfg = {"output_dir": str(out),
           "model": {"path": str(model), "tokenizer": str(tok)},
           "lora": {"dropout": 0.0},
           "data": {"path": str(shards), "micro_batch_size": 2, "global_batch_size": 8},
           "optim": {"max_steps": steps, "lr": 3e-3, "warmup_steps": 2},
           "engine": {"deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
           "checkpoint": {"save_every": 10_000, "keep_last": 1},
           "validation": {"every": 10_000, "sequences": 16},
           "logging": {"log_every": 1, "tensorboard": False}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------ the benchmark


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[0.2, 2.0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--shard-mb", type=float, default=256.0)
    ap.add_argument("--block", type=int, default=ROWS_BLOCK, help="tokens per sequence (at most 256, the tiny model's)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", default="bench/out/loader_memory")
    ap.add_argument("--pythonpath", default="", help="another checkout to run the ranks with (a 'before')")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    from cllama_dist.launch import local
    from cllama_dist.trainer.metrics import read_metrics

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tok, model = tokenizer_and_model(work)
    env = local.environment(cpu=True, nproc=args.nproc)
    if args.pythonpath:
        env["PYTHONPATH"] = str(Path(args.pythonpath).resolve()) + os.pathsep + env["PYTHONPATH"]
    rows = []
    for gb in args.sizes_gb:
        shards = work / f"shards_{gb:g}gb_b{args.block}"
        m = shard_set(shards, gb, tok, args.shard_mb, args.block)
        train_bytes = sum(s["bytes"] for s in m["splits"]["train"]["shards"])
        run = work / f"run_{gb:g}gb"
        report = work / f"ranks_{gb:g}gb"
        for d in (run, report):
            subprocess.run(["rm", "-rf", str(d)], check=True)
        report.mkdir()
        cfg = run_config(work / f"run_{gb:g}gb.yaml", model, tok, shards, run, args.steps)
        cmd = local.command(["--worker", str(report), "--config", str(cfg)], args.nproc, launcher="torchrun",
                            script=Path(__file__).resolve())
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"the run on {gb:g} GB failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        seconds = time.time() - t0
        rank0 = [r for r in read_metrics(run, "train") if "peak_memory_gib" in r]
        for f in sorted(report.glob("rank-*.json")):
            r = json.loads(f.read_text())
            rows.append({"set_gb": round(train_bytes / 1e9, 3), "shards": len(m["splits"]["train"]["shards"]),
                         "rank": r["rank"], "peak_rss_mb": r["ru_maxrss"] / 1e6, "anon_mb": r["RssAnon"] / 1e6,
                         "file_mb": r["RssFile"] / 1e6, "shmem_mb": r.get("RssShmem", 0) / 1e6,
                         "metrics_peak_gib": rank0[-1]["peak_memory_gib"] if rank0 and r["rank"] == 0 else None,
                         "run_s": round(seconds, 1)})
    print_table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def print_table(rows: list[dict], args) -> None:
    code = f"benchmark {commit()}"
    if args.pythonpath:
        head = subprocess.run(["git", "-C", args.pythonpath, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "unknown"
        code += f", ranks run the checkout {args.pythonpath} at {head}"
    print(f"\n### Peak RSS per rank against shard-set size ({args.nproc} ranks, torchrun, ZeRO-3 on CPU, tiny LLaMA, "
          f"{args.steps} steps x 8 sequences x {args.block} tokens)\n")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; {code}; {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
    print("| train shards | files | rank | peak RSS (ru_maxrss) | anon RSS at exit | file RSS at exit | shmem at exit "
          "| metrics.jsonl peak (rank 0) | run |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mp = f"{r['metrics_peak_gib'] * 1024:,.0f} MiB" if r["metrics_peak_gib"] is not None else ""
        print(f"| {r['set_gb']:.2f} GB | {r['shards']} | {r['rank']} | {r['peak_rss_mb']:,.0f} MB | {r['anon_mb']:,.0f} MB "
              f"| {r['file_mb']:,.0f} MB | {r['shmem_mb']:,.0f} MB | {mp} | {r['run_s']:.0f} s |")
    sizes = sorted({r["set_gb"] for r in rows})
    if len(sizes) > 1:
        print()
        for rank in sorted({r["rank"] for r in rows}):
            peaks = {r["set_gb"]: r["peak_rss_mb"] for r in rows if r["rank"] == rank}
            lo, hi = peaks[sizes[0]], peaks[sizes[-1]]
            ok = hi - lo <= max(0.10 * lo, 100)
            print(f"rank {rank}: {sizes[-1]:.2f} GB vs {sizes[0]:.2f} GB: {hi - lo:+,.0f} MB ({(hi - lo) / lo:+.1%}); "
                  f"target within 10% or 100 MB: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(worker(Path(sys.argv[2]), sys.argv[3:]))
    main()
