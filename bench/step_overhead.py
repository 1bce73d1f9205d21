"""CPU proxy of the trainer's framework overhead per optimizer step (issue 14, item 5).

    DS_ACCELERATOR=cpu python3 bench/step_overhead.py --out bench/out/step_overhead
    # and append the table to the docs:
    DS_ACCELERATOR=cpu python3 bench/step_overhead.py --out bench/out/step_overhead --append-docs docs/benchmarks.md

The model has the 1.1B shape's structure (22 layers, 32 heads, 4 KV heads, LoRA r 64 / alpha 128 on the seven
projections, the split head of 32,000 frozen + 17,953 new rows = 49,953) at width 64 (intermediate 128,
head dimension 2) and sequences of 32 tokens, so the arithmetic is negligible and a step's time is what the
framework costs: ZeRO-3's hooks, gathers and releases, autograd, launches, the loss path, synchronisations.
One process, DeepSpeed ZeRO-3 on the CPU (DS_ACCELERATOR=cpu, gloo), fp32, gradient checkpointing, micro-batch 1
x accumulation 4 (so per-micro-batch costs show). ``stage3_param_persistence_threshold`` is 0: at 1.1B every
weight (and every r-64 LoRA matrix, 64 x 2,048 = 131k elements) is above the default 100,000 and so
partitioned and gathered; at width 64 they would all fall below it and stay resident, which is not the 1.1B's
pattern.

Every setting is built in this one process before any is timed; then rounds of steps go through the settings
in turn (so that machine drift hits all alike), after warm-up steps; the figures are the median wall time and
the median CPU time of this process per step (one torch thread by default: the CPU time is then the work done,
which a machine shared with other jobs disturbs far less than the wall time). About 3 minutes on an idle
2-core machine (builds ~1 min, 6 settings x 8 steps of ~2.5 s, the profile); longer under load.
A step is what ``Trainer.run`` does per step: set the learning rate, ``train_step``, then the loop's per-step
reads (``before``: the gradient norm read as a float every step; ``after``: gradient norms kept as device
tensors and read together at the logging step, here the end of each round) and the stop-flag agreement.

Settings (``before`` is the trainer as of commit 7790984, its ``train_step`` reproduced verbatim below):

  before               old train_step (per micro-batch: torch.isfinite(loss).item(), an all-reduce of the flag,
                       loss.item(); dist.mean at the end), model.loss hf (cat of the two part logits, transformers'
                       fp32 loss), grad norm read every step
  after                this branch's default: one all-reduce + one host read per step, model.loss chunked
  after, loss hf       the new step with the old loss: what the synchronisation change alone does
  before, chunked      the old step with the new loss: what the loss change alone does
  after, resident      `after` with engine.frozen_base: resident (the ZeRO-3 config run as ZeRO-1: the frozen
                       base a plain tensor, no per-module hooks, gathers or releases; the trainable parameters'
                       optimizer state still partitioned): what auto picks on a GPU where the base fits
  after, resident as ZeRO-2   resident as it was until commit 6aab24f (ZeRO-2: the trainable gradients
                       partitioned too), side by side with ZeRO-1
  after, resident, every-other   and model.checkpoint_scope: every-other (half the layers recomputed)
  ref: persistent      (an existing DeepSpeed setting, not this branch's change) `after` with every parameter
                       persistent (stage3_param_persistence_threshold 1e12): no gathers or releases at all
  ref: no ckpt         (existing setting) `after` without gradient checkpointing: no recomputation pass

What each change should save, written before measuring (on this CPU proxy):
  - synchronisations: on a CPU every op has finished when it returns, so `.item()` costs microseconds, not a
    stall; what goes is 4 x (gloo all-reduce of one float on 1 rank + 2 reads) per step, tens of microseconds
    each: expected < 1 ms per step, well under 1 % of a step. (On a GPU the same change removes three stalls
    of the whole queue per micro-batch: that is where it is meant to pay, and it is not measurable here.)
  - chunked loss: the same GEMMs plus one recomputation GEMM of the head (64 x 32 tokens... here 32 tokens x
    49,953 x 64 per micro-batch, ~0.2 GFLOP), minus the cat copy, the fp32 log-softmax and its gradient over
    32 x 49,953 fp32 (6.4 MB each): roughly even on the CPU (bench/loss_memory.py at 8 x 2,048 tokens: 65.0 s
    chunked against 60.9 s); its gain is memory (19.9x less there), not CPU time.
  - so these two changes are not expected to reach the issue's target (proxy overhead at most 1/3 of
    today's default): the rest of the step is ZeRO-3's per-module work (22 layers x 7 projections, each
    gathered and released in the forward, the recomputation and the backward), which items 3-4 address.
    The profile below (--profile) says where the time goes.
  - resident (item 3), written before measuring: the profile of `after` puts ~1.6 s of a ~2.5 s step in
    ZeRO-3's per-module machinery (LinearFunctionForZeroStage3Backward ~0.8 s, pre/post-backward hooks ~0.76 s,
    ~7,000 calls) and 0.15 s in the matrix products; ZeRO-2 has none of it, so expected: the step falls to
    roughly a third or less of `before` (the target), what remains being autograd, PEFT's wrappers and the
    recomputation.
  - every-other checkpointing: half the recomputed forward of 22 layers: expected a further ~10-15 % off
    `after, resident`.
  - resident as ZeRO-1 instead of ZeRO-2, written before the change (profile of `after, resident` as ZeRO-2 on
    the 2-core VM, 2026-12-02 17:45 UTC: ~1,130 ms a step): ZeRO-2 runs its gradient hook
    (reduce_independent_p_g_buckets_and_remove_grads, ~110 ms a step with what it calls, 1,240 calls) after
    every micro-batch's backward, moving each trainable gradient into the reduce buckets and its partition;
    ZeRO-1 runs it only at the accumulation boundary (1 of 4 micro-batches). Expected: about 3/4 of that
    hook's time, ~80 ms, i.e. ~7-10 % off the resident step.

Output: OUT/results.json and OUT/results.md (machine, versions, commit, date); --append-docs appends the Markdown.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=256, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
NEW_VOCAB = 49953
SEQ, MICRO, ACCUM = 32, 1, 4
TARGET = 1 / 3


def legacy_trainer_class():
    """The trainer with its train_step as of commit 7790984 (before issue 14), verbatim but for names."""
    import torch

    from cllama_dist import distributed as dist
    from cllama_dist.data.loader import step_positions
    from cllama_dist.trainer import engine as engines
    from cllama_dist.trainer.loop import Trainer

    class LegacyTrainer(Trainer):
        def train_step(self, step: int) -> float | None:
            g = self.plan.global_batch
            positions = step_positions(step, g, self.plan.micro, dist.rank(), self.plan.world)
            losses = []
            for k, pos in enumerate(positions):
                idx = self.order.indices(pos)
                rows = self.train_blocks.rows(idx)
                self.engine.set_gradient_accumulation_boundary(k == len(positions) - 1)
                loss = self.micro_batch_loss(rows, step, k)
                if dist.any_true(not torch.isfinite(loss).item()):
                    if k:
                        engines.discard_gradients(self.engine)
                    return None
                self.engine.backward(loss)
                losses.append(loss.item())
            self.engine.step()
            return dist.mean(sum(losses) / len(losses))

    return LegacyTrainer


SETTINGS = {
    # label: (legacy step?, model.loss, deepspeed overrides, other model settings)
    "before": (True, "hf", {}, {}),
    "after": (False, "chunked", {}, {}),
    "after, loss hf": (False, "hf", {}, {}),
    "before, chunked": (True, "chunked", {}, {}),
    "after, resident": (False, "chunked", {}, {"frozen_base": "resident"}),
    "after, resident, every-other": (False, "chunked", {}, {"frozen_base": "resident", "checkpoint_scope": "every-other"}),
    "after, resident as ZeRO-2": (False, "chunked", {}, {"frozen_base": "resident", "resident_stage": 2}),
    "ref: persistent": (False, "chunked", {"stage3_param_persistence_threshold": 10**12}, {}),
    "ref: no ckpt": (False, "chunked", {}, {"gradient_checkpointing": False}),
}


def build(label: str, tokens):
    """A trainer object for one setting: the real Trainer (or the legacy one) with its engine, fed ``tokens``."""
    import torch

    from cllama_dist.config import build as build_config
    from cllama_dist.model.adapters import build_model
    from cllama_dist.model.config import LLAMA_PROJECTIONS
    from cllama_dist.trainer import engine as engines
    from cllama_dist.trainer.config import TrainConfig
    from cllama_dist.trainer.batches import DeviceCopier, model_inputs
    from cllama_dist.trainer.loop import Trainer
    from cllama_dist.trainer.plan import Plan

    legacy, loss, zero, model_over = SETTINGS[label]
    model_over = dict(model_over)
    frozen_base = model_over.pop("frozen_base", "partitioned")  # engine settings, not model ones
    resident_stage = model_over.pop("resident_stage", engines.RESIDENT_STAGE)
    cfg = build_config(TrainConfig, {
        "model": {"config": SHAPE, "embeddings": "new-rows", "gradient_checkpointing": True,
                  "attn_implementation": "sdpa", "loss": loss, "loss_kernel": "torch", **model_over},
        "lora": {"rank": 64, "alpha": 128, "dropout": 0.05, "targets": LLAMA_PROJECTIONS},
        "data": {"path": "unused", "micro_batch_size": MICRO, "global_batch_size": MICRO * ACCUM},
        "optim": {"max_steps": 10**6, "lr": 2e-4, "warmup_steps": 0},
        "engine": {"dtype": "fp32", "frozen_base": frozen_base,
                   "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0, **zero}}}})
    plan = Plan(world=1, micro=MICRO, accum=ACCUM, block=SEQ, max_steps=10**6, train_sequences=len(tokens))
    ds = engines.resolve(cfg, plan, "fp32", universal=False,
                         frozen_base=engines.FrozenBase(frozen_base, "bench", 3 if frozen_base == "partitioned" else resident_stage))
    zero3 = engines.zero_stage(ds) == 3
    model, _ = build_model(cfg.model, cfg.lora, 0, SHAPE["vocab_size"], NEW_VOCAB, torch.float32,
                           ds if zero3 else None, None, loss_kernel="torch")
    t = object.__new__(legacy_trainer_class() if legacy else Trainer)
    t.cfg, t.plan, t.device, t.dtype, t.model_dtype, t.sft = cfg, plan, "cpu", "fp32", torch.float32, False
    t.order = SimpleNamespace(indices=lambda pos: pos % len(tokens))
    t.train_blocks = SimpleNamespace(rows=lambda idx: {"input_ids": tokens[idx]}, token_loss=False)
    t.attn = "sdpa"
    t.copier = DeviceCopier(lambda rows: model_inputs(rows, "cpu", "sdpa", torch.float32), "cpu")
    t.engine = engines.initialize(model, cfg.optim, ds)
    t.legacy = legacy
    t.zero3 = zero3
    t.pending = []
    t.step_no = 0
    return t


@contextmanager
def own_process_linear(zero3: bool):
    """torch.nn.functional.linear as the setting's own training process has it.

    DeepSpeed's zero.Init replaces torch.nn.functional.linear by ZeRO-3's wrapper (LinearFunctionForZeroStage3,
    with its own autograd backward) for the rest of the process ("This will persist unless manually reset",
    deepspeed/runtime/zero/partition_parameters.py). A ZeRO-3 training process runs with it; a resident one
    never enters zero.Init and runs plain F.linear. All settings share this one process, so a resident setting
    built after a partitioned one would run every Linear through ZeRO-3's function (measured: a quarter of its
    step, commit 37d620b): its steps run with the plain function put back, the partitioned ones as they are.
    """
    import torch
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init

    plain = getattr(Init, "linear_bk", None)  # the original, saved by the first zero.Init
    if zero3 or plain is None:
        yield
        return
    current, torch.nn.functional.linear = torch.nn.functional.linear, plain
    try:
        yield
    finally:
        torch.nn.functional.linear = current


def one_step(t) -> None:
    """What Trainer.run does per step (see the module docstring), for either step."""
    from cllama_dist import distributed as dist
    from cllama_dist.trainer import engine as engines

    with own_process_linear(t.zero3):
        engines.set_lr(t.engine, 1.0)
        loss = t.train_step(t.step_no)
        t.step_no += 1
        assert loss is not None and loss == loss
        norm = t.engine.get_global_grad_norm()
        if t.legacy:
            float(norm)
        else:
            t.pending.append(norm)
        dist.any_true(False)  # the stop-flag agreement, once per step in both


def flush(t) -> None:
    import torch

    if t.pending:
        torch.stack([n.detach().double().reshape(()) for n in t.pending]).tolist()
        t.pending = []


def profile(t, steps: int) -> dict:
    """Where the time of ``steps`` steps goes: cProfile's own time summed per package, and torch's op table."""
    import torch

    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step(t)
    flush(t)
    wall = time.perf_counter() - t0
    prof.disable()
    stats = pstats.Stats(prof)
    by_pkg: dict[str, float] = {}
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        f = filename.replace("\\", "/")
        if "/deepspeed/" in f:
            key = "deepspeed (Python)"
        elif "/transformers/" in f:
            key = "transformers (Python)"
        elif "/peft/" in f:
            key = "peft (Python)"
        elif "/cllama_dist/" in f:
            key = "cllama_dist (Python)"
        elif "/torch/" in f:
            key = "torch (Python)"
        elif f.startswith("~") or f.startswith("<"):
            key = "built-ins and C (torch ops, autograd engine)"
        else:
            key = "other Python"
        by_pkg[key] = by_pkg.get(key, 0.0) + tottime
    total = sum(by_pkg.values())
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        one_step(t)
        flush(t)
    ops = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3}
           for e in sorted(tp.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]]
    return {"steps": steps, "wall_s": wall, "share": {k: v / total for k, v in sorted(by_pkg.items(), key=lambda kv: -kv[1])},
            "cumulative_top": text.getvalue(), "torch_ops_one_step": ops}


def markdown(report: dict) -> str:
    env, res = report["environment"], report["results"]
    before = res["before"]["median_ms"]
    lines = [f"### Step overhead, CPU proxy of the 1.1B shape ({env['date']}, commit {env['commit']})", "",
             "`DS_ACCELERATOR=cpu python3 bench/step_overhead.py --out bench/out/step_overhead`", "",
             f"Machine: {env.get('cpu')} ({env.get('cores')} cores), torch {env['torch']}, transformers "
             f"{env['transformers']}, peft {env['peft']}, deepspeed {env['deepspeed']}. One process, ZeRO-3 on the CPU, "
             f"22 layers x width 64, LoRA r 64 on 7 projections, head 32,000 + 17,953 rows, fp32, gradient checkpointing, "
             f"micro-batch {MICRO} x accumulation {ACCUM} x {SEQ} tokens, {report['threads']} torch threads; {report['rounds']} rounds x {report['steps']} "
             f"steps per setting after {report['warmup']} warm-up steps; median of the steps.", "",
             "| setting | wall ms per step (median) | min | max | vs before | CPU ms per step (median) | vs before |",
             "|---|---|---|---|---|---|---|"]
    cpu_before = res["before"]["cpu_median_ms"]
    for label, r in res.items():
        lines.append(f"| {label} | {r['median_ms']:,.1f} | {r['min_ms']:,.1f} | {r['max_ms']:,.1f} | "
                     f"{r['median_ms'] / before:.3f} | {r['cpu_median_ms']:,.1f} | {r['cpu_median_ms'] / cpu_before:.3f} |")
    # Two defaults: `after` is what engine.frozen_base: auto picks on the CPU (partitioned); `after, resident` is
    # what it picks on a GPU whose memory holds the frozen base (the case this proxy stands for).
    for label, where in (("after", "the CPU default"), ("after, resident", "the GPU default where the base fits")):
        if label not in res:
            continue
        wall, cpu = res[label]["median_ms"] / before, res[label]["cpu_median_ms"] / cpu_before
        lines += ["", f"Target (issue 14): the proxy's step at most {TARGET:.3f} of before; `{label}` ({where}) is "
                  f"{wall:.3f} (wall), {cpu:.3f} (CPU time): " + ("met." if max(wall, cpu) <= TARGET else
                                                                 "NOT met." if min(wall, cpu) > TARGET else
                                                                 "met by one measure, not the other.")]
    if report.get("profile"):
        p = report["profile"]
        lines += ["", f"Where the time of `after` goes (cProfile, {p['steps']} steps, own time by package):", ""]
        lines += [f"- {k}: {100 * v:.1f}%" for k, v in p["share"].items()]
        lines += ["", "Top torch ops of one step (self CPU ms): " + ", ".join(
            f"{o['op']} {o['self_ms']:.1f} ({o['calls']}x)" for o in p["torch_ops_one_step"][:8])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out/step_overhead")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per setting per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: a step's CPU time is then its work, which other jobs on a shared machine "
                        "disturb far less than its wall time; recorded with the results)")
    p.add_argument("--append-docs", default="")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from cllama_dist import distributed as dist
    from cllama_dist.quiet import muted_stdout
    from train_throughput import environment

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dist.init()
    tokens = np.random.default_rng(0).integers(0, NEW_VOCAB, (256, SEQ)).astype(np.int64)
    trainers = {}
    for label in args.settings:
        t0 = time.perf_counter()
        with muted_stdout():
            trainers[label] = build(label, tokens)
        print(f"built {label} in {time.perf_counter() - t0:.1f} s", flush=True)
    for label, t in trainers.items():
        for _ in range(args.warmup):
            one_step(t)
        flush(t)
    # Wall time, and this process's CPU time: on a machine shared with other jobs the wall time of a step
    # swings with their load, its CPU time much less (with 1 thread it is the work done, spinning aside).
    times: dict[str, list[float]] = {label: [] for label in trainers}
    cpu: dict[str, list[float]] = {label: [] for label in trainers}
    for r in range(args.rounds):
        for label, t in trainers.items():
            for i in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                one_step(t)
                if i == args.steps - 1:
                    flush(t)  # the logging step's read, counted with the round's last step
                times[label].append(time.perf_counter() - t0)
                cpu[label].append(time.process_time() - c0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {1e3 * statistics.median(v):.0f} ms"
                                                          for k, v in times.items()), flush=True)
    results = {label: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v),
                       "cpu_median_ms": 1e3 * statistics.median(cpu[label]), "steps_ms": [1e3 * x for x in v],
                       "cpu_steps_ms": [1e3 * x for x in cpu[label]]} for label, v in times.items()}
    report = {"environment": environment("cpu"), "threads": args.threads, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
              "shape": SHAPE, "new_vocab": NEW_VOCAB, "seq": SEQ, "micro": MICRO, "accum": ACCUM,
              "results": results}
    if args.profile and "after" in trainers:
        report["profile"] = profile(trainers["after"], 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report) if "before" in results and "after" in results else ""
    (out / "results.md").write_text(md)
    print(md)
    if args.append_docs and md:
        with open(args.append_docs, "a") as f:
            f.write("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
