"""Training throughput on one device: this project's trainer against the Hugging Face Trainer + PEFT reference.

    # One GPU, the ~1.1B model, sequence 2,048 then 512 (about 6 minutes on an H100/H200):
    python bench/train_throughput.py --tokenizer .gpu/merged --shards 2048=.gpu/shards2048 \
        --shards 512=.gpu/shards512 --out bench/out/throughput
    # The same code paths in about a minute on a CPU (what CI runs):
    python bench/train_throughput.py --tiny --device cpu --out /tmp/tp

Side by side in one run, each in a fresh process (so that peak memory is its own), after warm-up steps:

  ours-new-rows   cllama_dist's Trainer, `embeddings: new-rows` (the project's default)
  ours-full       cllama_dist's Trainer, `embeddings: full` (the paper's choice: both matrices train)
  reference       transformers.Trainer + PEFT LoRA with modules_to_save=["embed_tokens", "lm_head"] after
                  resize_token_embeddings (how the paper's run_clm_pt_with_peft.py trains), given the very
                  DeepSpeed config our trainer resolved, the same LoRA, batch, sequence length, dtype,
                  gradient checkpointing, attention kernel and shards.

Every variant: bf16 on a GPU (fp32 on the CPU), the ZeRO-3 config, gradient checkpointing, LoRA r 64 / alpha 128 on
all seven projections, micro-batch = global batch (no accumulation). Measured per variant: step time (mean
of the steps after warm-up, device-synchronised), tokens/s, MFU = tokens/s x FLOPs per token / peak
(FLOPs from cllama_dist/model/flops.py: the formula is written out there; the reference counted with
`full`, since modules_to_save trains both whole matrices), peak device memory (torch.cuda.max_memory_allocated
over the whole process: load, init and steps), and the optimizer-state bytes actually allocated (DeepSpeed's
fp32 master partitions plus Adam's two moments). Ratios are against the reference at the same length.

`--variant LABEL:key=value,...` adds a variant of our trainer with TrainConfig overrides (for example
`partitioned:engine.frozen_base=partitioned`, ZeRO-3 gathering the frozen base as the reference does, or
`every-other:model.checkpoint_scope=every-other`), measured in the same run at the first sequence length only.
Our variants run with `engine.frozen_base: auto` unless they set it: on a GPU where the base fits, resident
(the ZeRO-3 config run as ZeRO-1); the reference always runs the ZeRO-3 config partitioned. The table's ZeRO
column gives the stage each variant ran.

Output: OUT/results.json, OUT/results.md (with GPU, driver, versions, commit, date), one log per variant;
`--append-docs docs/benchmarks.md` appends the Markdown there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import commit  # noqa: E402  (a sibling module: benchmarks run as `python bench/NAME.py`)

MODEL_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)
BASE = ("ours-new-rows", "ours-full", "reference")
TARGET_SPEEDUP, TARGET_MEMORY_CUT, TARGET_MFU = 1.25, 0.25, 0.45


# --------------------------------------------------------------------------------------------------
# One variant, in its own process.


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def optimizer_state_bytes(engine) -> int:
    """Bytes the optimizer holds: DeepSpeed's fp32 master partitions plus Adam's moments (and step counters).

    DeepSpeed empties the wrapped optimizer's param_groups between steps, so the masters are read from the
    ZeRO optimizer itself (stage 3: fp32_partitioned_groups_flat; stages 1-2: single_partition_of_fp32_groups).
    """
    import torch

    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    masters = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups", None)
    if masters is None:
        masters = [p for g in inner.param_groups for p in g["params"]]
    tensors = {id(t): t for t in masters if torch.is_tensor(t)}
    for state in inner.state.values():
        tensors.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def peak_memory(device: str) -> dict:
    import torch

    if device.startswith("cuda"):
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_reserved_bytes": None}


def train_config(spec: dict, overrides: dict):
    """The run config of every variant (``overrides``: dotted keys, e.g. ``model.embeddings``)."""
    from cllama_dist.config import build
    from cllama_dist.model.config import LLAMA_PROJECTIONS
    from cllama_dist.trainer.config import TrainConfig

    values = {"output_dir": str(Path(spec["run_dir"]) / "run"),  # beside spec.json, in a folder of its own
              "model": {"config": spec["model_config"], "tokenizer": spec["tokenizer"], "embeddings": "new-rows",
                        "gradient_checkpointing": True, "attn_implementation": spec["attn"]},
              "lora": {"rank": spec["lora_rank"], "alpha": 2 * spec["lora_rank"], "dropout": 0.05,
                       "targets": LLAMA_PROJECTIONS},
              "data": {"path": spec["data"], "block_size": spec["seq"], "micro_batch_size": spec["micro_batch"],
                       "global_batch_size": spec["micro_batch"]},
              "optim": {"max_steps": spec["warmup"] + spec["steps"], "lr": 2e-4, "warmup_steps": 1,
                        "adam_betas": [0.9, 0.95]},
              "engine": {"dtype": spec["dtype"]},
              "checkpoint": {"save_every": 0, "resume": ""},
              "validation": {"every": 0},
              "logging": {"tensorboard": False, "log_every": 10**6}}
    return build(TrainConfig, {**values, **overrides})


def run_ours(spec: dict, overrides: dict) -> dict:

    from cllama_dist import distributed as dist
    from cllama_dist.trainer import engine as engines
    from cllama_dist.trainer.loop import Trainer
    from cllama_dist.trainer.plan import lr_factor

    cfg = train_config(spec, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    setup_s = time.perf_counter() - t0
    device = trainer.device
    times, losses = [], []
    for step in range(cfg.optim.max_steps):
        engines.set_lr(trainer.engine, lr_factor(step, cfg.optim, cfg.optim.max_steps))
        _sync(device)
        t = time.perf_counter()
        loss = trainer.train_step(step)
        _sync(device)
        times.append(time.perf_counter() - t)
        losses.append(None if loss is None else float(loss))
    trainer.logger.close()
    out = {"setup_s": setup_s, "step_times_s": times, "losses": losses, "device": device,
           "trainable": trainer.counts.trainable, "lora_params": trainer.counts.lora,
           "flops_per_token": trainer.flops, "optimizer_state_bytes": optimizer_state_bytes(trainer.engine),
           "embeddings": cfg.model.embeddings, "deepspeed_config": trainer.spec.engine.ds_config,
           "frozen_base": trainer.spec.engine.frozen.choice, "attn": trainer.attn, **peak_memory(device)}
    dist.barrier()
    return out


def run_reference(spec: dict) -> dict:
    """transformers.Trainer + PEFT modules_to_save, with the DeepSpeed config our trainer resolves."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from cllama_dist import distributed as dist
    from cllama_dist.data.loader import TokenBlocks
    from cllama_dist.data.shards import load_manifest
    from cllama_dist.model import flops
    from cllama_dist.model.config import LLAMA_PROJECTIONS, resolve_attn
    from cllama_dist.tokenizer import spm
    from cllama_dist.trainer.engine import resolve as deepspeed_config
    from cllama_dist.trainer.plan import Plan

    # The ZeRO-3 config exactly as the file gives it: partitioned (engine.frozen_base is ours, not the reference's).
    cfg = train_config(spec, {"engine.frozen_base": "partitioned"})
    device = dist.init()
    t0 = time.perf_counter()
    plan = Plan.make(cfg.data, cfg.optim.max_steps, 1, spec["seq"], 10**6)
    ds = deepspeed_config(cfg, plan, spec["dtype"], universal=False)
    cuda = device.startswith("cuda")
    args = TrainingArguments(
        output_dir=spec["run_dir"], per_device_train_batch_size=cfg.data.micro_batch_size, gradient_accumulation_steps=1,
        max_steps=cfg.optim.max_steps, learning_rate=cfg.optim.lr, warmup_steps=1, lr_scheduler_type="cosine",
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=cfg.optim.clip_grad, bf16=spec["dtype"] == "bf16",
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, deepspeed=ds,
        logging_steps=10**6, save_strategy="no", report_to=[], remove_unused_columns=False, seed=0,
        dataloader_pin_memory=cuda, use_cpu=not cuda, disable_tqdm=True)
    new_vocab = spm.fingerprint(spec["tokenizer"])["vocab_size"]
    config = LlamaConfig(**{**spec["model_config"], "tie_word_embeddings": False, "use_cache": False})
    config._attn_implementation = resolve_attn(spec["attn"], cuda, spec["dtype"])  # the kernel ours resolves to
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[spec["dtype"]]
    model = LlamaForCausalLM(config).to(dtype)
    model.resize_token_embeddings(new_vocab)  # the paper's way: one matrix per module, every row trainable
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=LLAMA_PROJECTIONS, modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    manifest = load_manifest(spec["data"])
    blocks = TokenBlocks(spec["data"], manifest, "train")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            x = torch.from_numpy(blocks.take(np.array([i]))[0])
            return {"input_ids": x, "labels": x}

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            _sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            self.times.append(time.perf_counter() - self.t)

    timer = Timer()
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[timer])
    setup_s = time.perf_counter() - t0  # the engine itself is built inside train(); counted in the first step
    result = trainer.train()
    engine = getattr(trainer, "deepspeed", None) or trainer.model_wrapped
    fl = flops.run_flops(config, spec["model_config"]["vocab_size"], new_vocab, "full", spec["seq"], lora_params, True)
    out = {"setup_s": setup_s, "step_times_s": timer.times, "losses": [result.training_loss], "device": device,
           "trainable": trainable, "lora_params": lora_params, "flops_per_token": fl,
           "optimizer_state_bytes": optimizer_state_bytes(engine), "embeddings": "full (modules_to_save)",
           "deepspeed_config": ds, "frozen_base": "partitioned", "attn": config._attn_implementation, **peak_memory(device)}
    dist.barrier()
    return out


def worker(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.spec).read_text())
    if args.variant == "reference":
        out = run_reference(spec)
    else:
        out = run_ours(spec, spec["variants"][args.variant])
    Path(args.result).write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


# --------------------------------------------------------------------------------------------------
# The orchestrator.


def tiny_inputs(work: Path) -> tuple[dict, str, dict[int, str]]:
    """A tiny LLaMA config, a merged tokenizer and shards at two lengths, built from the shipped corpus."""
    import sentencepiece as spmlib

    from cllama_dist.assets import corpus_path
    from cllama_dist.data.config import PreprocessConfig
    from cllama_dist.tokenizer.config import MergeConfig, TokenizerTrainConfig
    from cllama_dist.data.preprocess import preprocess
    from cllama_dist.tokenizer.base import build_base_tokenizer
    from cllama_dist.tokenizer.merge import merge
    from cllama_dist.tokenizer.train import train

    if not (work / "merged" / "tokenizer.model").is_file():
        build_base_tokenizer(work / "base", vocab_size=1000)
        train(TokenizerTrainConfig(inputs=[str(corpus_path())], output=str(work / "zh"), vocab_size=3000, threads=1))
        merge(MergeConfig(base=str(work / "base"), add=str(work / "zh.model"), out=str(work / "merged"), overwrite=True))
    shards = {}
    for seq in (128, 64):
        out = work / f"shards{seq}"
        if not (out / "manifest.json").is_file():
            preprocess(PreprocessConfig(inputs=[str(corpus_path())], tokenizer=str(work / "merged"), output=str(out),
                                        block_size=seq, validation_fraction=0.0, workers=1, overwrite=True))
        shards[seq] = str(out)
    vocab = spmlib.SentencePieceProcessor(model_file=str(work / "base" / "tokenizer.model")).get_piece_size()
    from cllama_dist.model.presets import TINY

    return {**TINY, "vocab_size": vocab}, str(work / "merged"), shards


def environment(device: str) -> dict:
    import importlib.metadata as md

    import torch

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "transformers": ver("transformers"), "peft": ver("peft"),
           "deepspeed": ver("deepspeed"), "flash_attn": ver("flash-attn"), "commit": commit()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            env["driver"] = None
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["cores"] = os.cpu_count()
    return env


def summarise(raw: dict, spec: dict, peak_tflops: float) -> dict:
    times = raw["step_times_s"][spec["warmup"]:]
    if not times:
        raise RuntimeError("no measured steps")
    step = sum(times) / len(times)
    tokens = spec["micro_batch"] * spec["seq"]
    tps = tokens / step
    out = {"step_time_s": step, "step_time_min_s": min(times), "step_time_max_s": max(times), "tokens_per_s": tps,
           "flops_per_token": raw["flops_per_token"]["actual"],
           "flops_per_token_conventional": raw["flops_per_token"]["conventional"],
           "mfu": tps * raw["flops_per_token"]["actual"] / (peak_tflops * 1e12) if peak_tflops else None,
           "mfu_conventional": tps * raw["flops_per_token"]["conventional"] / (peak_tflops * 1e12) if peak_tflops else None,
           "peak_memory_bytes": raw["peak_memory_bytes"], "peak_reserved_bytes": raw["peak_reserved_bytes"],
           "optimizer_state_bytes": raw["optimizer_state_bytes"], "trainable_parameters": raw["trainable"],
           "lora_parameters": raw["lora_params"], "embeddings": raw["embeddings"], "setup_s": raw["setup_s"],
           "measured_steps": len(times), "losses": raw["losses"],
           "zero_stage": raw["deepspeed_config"].get("zero_optimization", {}).get("stage", 0),
           "frozen_base": raw.get("frozen_base"), "attn": raw.get("attn")}
    return out


def ratios(results: dict) -> None:
    for seq, row in results.items():
        ref = row.get("reference", {})
        for name, r in row.items():
            if name == "reference" or "tokens_per_s" not in r or "tokens_per_s" not in ref:
                continue
            r["speedup_vs_reference"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["memory_vs_reference"] = r["peak_memory_bytes"] / ref["peak_memory_bytes"]
            if ref["optimizer_state_bytes"]:
                r["optimizer_state_vs_reference"] = r["optimizer_state_bytes"] / ref["optimizer_state_bytes"]


def targets(results: dict, device: str, long_seq: int) -> list[str]:
    if device != "cuda":
        return ["targets apply to one H100/H200; not judged on the CPU"]
    lines = []
    r = results.get(str(long_seq), {}).get("ours-new-rows", {})
    if "speedup_vs_reference" in r:
        ok = r["speedup_vs_reference"] >= TARGET_SPEEDUP
        lines.append(f"{'PASS' if ok else 'FAIL'} speed: {r['speedup_vs_reference']:.2f}x the reference (target >= {TARGET_SPEEDUP}x)")
        cut = 1 - r["memory_vs_reference"]
        lines.append(f"{'PASS' if cut >= TARGET_MEMORY_CUT else 'FAIL'} memory: {100 * cut:.1f}% less peak memory "
                     f"(target >= {100 * TARGET_MEMORY_CUT:.0f}%)")
    if r.get("mfu") is not None:
        lines.append(f"{'PASS' if r['mfu'] >= TARGET_MFU else 'FAIL'} MFU at {long_seq}: {100 * r['mfu']:.1f}% "
                     f"(target >= {100 * TARGET_MFU:.0f}%)")
    return lines or ["targets not judged: a variant is missing"]


def markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    where = (f"{env.get('gpu')}, driver {env.get('driver')}" if report["device"] == "cuda"
             else f"CPU ({env.get('cores')} cores), {s['dtype']}")
    lines = [f"### Training throughput, {report['mode']} ({env['date']}, commit {env['commit']})", "",
             f"`{report['command']}`", "",
             f"{where}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"deepspeed {env['deepspeed']}. Model: {s['model']}; LoRA r {s['lora_rank']} on 7 projections; "
             f"micro-batch {s['micro_batch']}, {s['dtype']}, the ZeRO-3 config (ours: engine.frozen_base auto unless "
             f"the variant sets it; the ZeRO column is the stage that ran), gradient checkpointing, "
             f"{s['attn']} attention; "
             f"{s['warmup']} warm-up + {s['steps']} measured steps; peak {s['peak_tflops'] or '-'} TFLOP/s.", "",
             "| seq | variant | ZeRO (frozen base) | tokens/s | step s | MFU (actual) | MFU (6N) | peak mem GiB | "
             "optimizer state GiB | trainable | vs reference: speed, memory |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for seq, row in report["results"].items():
        for name, r in row.items():
            if "tokens_per_s" not in r:
                lines.append(f"| {seq} | {name} | - | - | - | - | - | - | - | - | {r.get('error', 'not run')} |")
                continue
            pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
            vs = (f"{r['speedup_vs_reference']:.2f}x, {100 * (r['memory_vs_reference'] - 1):+.0f}%"
                  if "speedup_vs_reference" in r else "(reference)" if name == "reference" else "-")
            lines.append(f"| {seq} | {name} | {r['zero_stage']} ({r.get('frozen_base') or '-'}) | {r['tokens_per_s']:,.0f} | {r['step_time_s']:.3f} | {pct(r['mfu'])} | "
                         f"{pct(r['mfu_conventional'])} | {r['peak_memory_bytes'] / 2**30:.2f} | "
                         f"{r['optimizer_state_bytes'] / 2**30:.3f} | {r['trainable_parameters']:,} | {vs} |")
    lines += ["", *[f"- {t}" for t in report["targets"]], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model and inputs built here (seconds; CI)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tokenizer", help="the merged tokenizer (with its merge_report.json); built with --tiny")
    p.add_argument("--shards", action="append", default=[], metavar="SEQ=DIR",
                   help="shards of block SEQ (repeat; the first length is the one the targets are judged at)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: 8 GPU, 2 tiny)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="steps not measured (default 3)")
    p.add_argument("--steps", type=int, default=8, help="measured steps (default 8)")
    p.add_argument("--attn", default="auto", help="attention kernel for every variant (default auto: model/config.py "
                                                  "resolve_attn, flash-attn where installed on a GPU, else sdpa)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: known GPUs by name)")
    p.add_argument("--variants", nargs="+", default=list(BASE), help=f"which of {', '.join(BASE)} (default: all)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:key=value,...",
                   help="an extra variant of our trainer with TrainConfig overrides")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new variant after this many seconds")
    p.add_argument("--variant-timeout-s", type=float, default=240.0)
    p.add_argument("--out", default="bench/out/throughput")
    p.add_argument("--append-docs", default=None, metavar="MD", help="append the Markdown table to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.variant = args.worker
        return worker(args)

    from cllama_dist.launch.local import single_process_env

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        model_config, tokenizer, shards = tiny_inputs(out / "tiny-inputs")
        micro = args.micro_batch or 2
    else:
        if not args.tokenizer or not args.shards:
            p.error("give --tokenizer and --shards SEQ=DIR (or --tiny)")
        model_config, tokenizer = MODEL_1B, args.tokenizer
        shards = {}
        for item in args.shards:
            seq, _, folder = item.partition("=")
            if not seq.isdigit() or not Path(folder, "manifest.json").is_file():
                p.error(f"--shards {item}: expected SEQ=DIR with DIR/manifest.json")
            shards[int(seq)] = folder
        micro = args.micro_batch or 8
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device here (use --device cpu with --tiny)")
        from cllama_dist.model.flops import peak_tflops

        peak = args.peak_tflops or peak_tflops(torch.cuda.get_device_name())
        dtype = "bf16"
    else:
        peak, dtype = args.peak_tflops, "fp32"
    variants: dict[str, dict] = {"ours-new-rows": {"model.embeddings": "new-rows"},
                                 "ours-full": {"model.embeddings": "full"}}
    order = [v for v in args.variants if v in BASE]
    for item in args.variant:
        label, _, body = item.partition(":")
        over = {}
        for kv in filter(None, body.split(",")):
            k, _, v = kv.partition("=")
            over[k] = json.loads(v) if v[:1] in "[{0123456789-" or v in ("true", "false") else v
        variants[label] = {"model.embeddings": "new-rows", **over}
        order.append(label)

    results: dict[str, dict] = {}
    for i, (seq, data) in enumerate(shards.items()):
        row = results.setdefault(str(seq), {})
        for name in order if i == 0 else [v for v in order if v in BASE]:  # extra variants: first length only
            if time.time() - t_start > args.budget_s:
                row[name] = {"error": f"skipped: time budget of {args.budget_s:.0f} s spent"}
                continue
            with tempfile.TemporaryDirectory(prefix="tp-") as run_dir:
                spec = {"model_config": model_config, "tokenizer": tokenizer, "data": data, "seq": seq,
                        "micro_batch": micro, "lora_rank": args.lora_rank, "warmup": args.warmup, "steps": args.steps,
                        "dtype": dtype, "attn": args.attn, "run_dir": run_dir, "variants": variants}
                spec_path, result_path = Path(run_dir) / "spec.json", Path(run_dir) / "result.json"
                spec_path.write_text(json.dumps(spec))
                env = single_process_env(cpu=args.device == "cpu")
                log = out / f"{name}-{seq}.log"
                print(f"== {name}, sequence {seq} ...", flush=True)
                t0 = time.time()
                try:
                    with open(log, "w") as fh:
                        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--spec", str(spec_path),
                                               "--result", str(result_path)], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                              timeout=args.variant_timeout_s)
                    ok = proc.returncode == 0 and result_path.is_file()
                    err = None if ok else f"exit {proc.returncode}; see {log.name}"
                except subprocess.TimeoutExpired:
                    ok, err = False, f"timed out after {args.variant_timeout_s:.0f} s; see {log.name}"
                if ok:
                    row[name] = summarise(json.loads(result_path.read_text()), spec, peak)
                    r = row[name]
                    print(f"   {r['tokens_per_s']:,.0f} tokens/s, step {r['step_time_s']:.3f} s, peak "
                          f"{r['peak_memory_bytes'] / 2**30:.2f} GiB, optimizer state "
                          f"{r['optimizer_state_bytes'] / 2**30:.3f} GiB ({time.time() - t0:.0f} s)", flush=True)
                else:
                    row[name] = {"error": err}
                    tail = log.read_text(errors="replace").splitlines()[-12:]
                    print(f"   FAILED: {err}\n" + "\n".join("   | " + l for l in tail), flush=True)
    ratios(results)
    long_seq = next(iter(shards))
    report = {"mode": "tiny (CPU)" if args.tiny and args.device == "cpu" else "tiny" if args.tiny else "1.1B",
              "device": args.device, "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "environment": environment(args.device),
              "settings": {"model": ("tiny " if args.tiny else "~1.1B ") + json.dumps(model_config), "micro_batch": micro,
                           "lora_rank": args.lora_rank, "warmup": args.warmup, "steps": args.steps, "dtype": dtype,
                           "attn": args.attn, "peak_tflops": peak, "tokenizer": tokenizer, "shards": shards,
                           "variants": {k: variants.get(k, {"reference": True}) for k in order}},
              "results": results, "targets": targets(results, args.device, long_seq),
              "wall_s": round(time.time() - t_start, 1)}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (out / "results.md").write_text(md + "\n")
    if args.append_docs:
        with open(args.append_docs, "a") as fh:
            fh.write("\n" + md + "\n")
    print("\n" + md)
    failed = [f"{seq}/{n}" for seq, row in results.items() for n, r in row.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    from cllama_dist.train import exit_now  # a worker's exit without the interpreter's teardown (seconds each)

    exit_now(main())
