"""Correctness on the GPU, in the same device call as the throughput benchmark (issue 14, item 6).

    # On the lent GPU (bench/gpu/throughput.sh runs it first; inputs from bench/gpu/make_inputs.sh):
    python bench/gpu/correctness.py --tokenizer .gpu/merged --shards .gpu/shards512 --out $OUT/correctness
    # Here, the same code end to end on the CPU (fp32 on both sides, tiny model and inputs built here):
    python bench/gpu/correctness.py --cpu --out /tmp/correctness

Three checks, written to OUT/correctness.json with pass/fail and the measured differences:

  losses    our trainer, the same model, data and seed, trained for the first steps twice, each in a fresh
            process: on the CPU in fp32 (the tests' arithmetic) and on the device in bf16 (the default
            there, with engine.frozen_base auto). Each step's loss must agree within LOSS_RTOL (bf16 keeps
            8 mantissa bits, 2^-8 = 0.4% per rounding; the first steps accumulate a few of them).
  old_rows  in each of the two runs, rows [0, V) of embed_tokens and lm_head are bit-identical after training
            to before it, and the device's bf16 rows are exactly the CPU's fp32 rows rounded to bf16 (the
            model is built in fp32 and cast): training never touched them. The new rows must have moved.
  fused     model/loss.py's split_linear_cross_entropy (chunked, never the full logits) against
            reference_cross_entropy (the unfused cat + cross-entropy), both in the device dtype, each against
            the unfused loss in fp32 (fp64 on the CPU): loss and the gradients of the hidden states and of
            the new rows; the chunked path may not be further from the truth than FUSED_TOL's slack x the unfused
            one (plus a floor). A fused GPU kernel (Liger, cut-cross-entropy), if installed, is checked too.
  copier    trainer/batches.py's DeviceCopier (pinned memory, side stream, one micro-batch ahead) gives the
            very tensors of a direct copy, in order.

Exit status 0 when every check passes, 1 otherwise (the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

LOSS_RTOL = {"bf16": 2e-2, "fp32": 1e-5}
# (slack, floor): the chunked loss may be at most slack x as far from the truth as the unfused one, plus floor.
FUSED_TOL = {"bf16": (2.0, 2e-3), "fp32": (2.0, 1e-6)}
STEPS = 6
# A small LLaMA at the paper's vocabulary on the device (the CPU side must train it too, on the device's cores).
MODEL_SMALL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)


def _spec(run_dir: str, model_config: dict, tokenizer: str, data: str, seq: int, dtype: str) -> dict:
    return {"model_config": model_config, "tokenizer": tokenizer, "data": data, "seq": seq, "micro_batch": 4,
            "lora_rank": 8, "warmup": 0, "steps": STEPS, "dtype": dtype, "attn": "auto", "run_dir": run_dir}


def _old_rows(engine) -> dict:
    """name -> a CPU copy of each weight_base / weight_new (gathered when ZeRO-3 partitions it)."""
    import deepspeed

    out = {}
    for name, p in engine.module.named_parameters():
        if name.endswith(("weight_base", "weight_new")):
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p]):
                    out[name] = p.detach().cpu().clone()
            else:
                out[name] = p.detach().cpu().clone()
    return out


def train_worker(spec_path: str, result: str) -> int:
    """One run of our trainer (a fresh process): losses of the first steps and the rows before/after."""
    import torch

    from cllama_dist.trainer import engine as engines
    from cllama_dist.trainer.loop import Trainer
    from cllama_dist.trainer.plan import lr_factor
    from train_throughput import train_config

    spec = json.loads(Path(spec_path).read_text())
    cfg = train_config(spec, {"lora.dropout": 0.0})
    trainer = Trainer(cfg)
    before = _old_rows(trainer.engine)
    losses = []
    for step in range(cfg.optim.max_steps):
        engines.set_lr(trainer.engine, lr_factor(step, cfg.optim, cfg.optim.max_steps))
        loss = trainer.train_step(step)
        losses.append(None if loss is None else float(loss))
    after = _old_rows(trainer.engine)
    trainer.logger.close()
    torch.save({"before": before, "after": after}, Path(result).with_suffix(".pt"))
    Path(result).write_text(json.dumps({"losses": losses, "device": trainer.device, "dtype": trainer.spec.engine.dtype,
                                        "frozen_base": trainer.spec.engine.frozen.choice, "attn": trainer.attn,
                                        "zero_stage": trainer.spec.engine.zero_stage}) + "\n")
    return 0


def run_training(work: Path, spec: dict, cpu: bool, timeout: float) -> tuple[dict | None, dict | None, str]:
    from cllama_dist.launch.local import single_process_env

    name = "cpu-fp32" if cpu else f"device-{spec['dtype']}"
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "run_dir": str(run_dir)}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    result = run_dir / "result.json"
    log = work / f"{name}.log"
    with open(log, "w") as fh:
        try:
            proc = subprocess.run([sys.executable, __file__, "--worker", str(run_dir / "spec.json"), str(result)],
                                  env=single_process_env(cpu=cpu), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, None, f"{name}: timed out after {timeout:.0f} s (see {log.name})"
    if proc.returncode or not result.is_file():
        return None, None, f"{name}: exit {proc.returncode} (see {log.name})"
    import torch

    return json.loads(result.read_text()), torch.load(result.with_suffix(".pt")), ""


def check_losses(ref: dict, dev: dict, dtype: str) -> dict:
    pairs = list(zip(ref["losses"], dev["losses"]))
    ok_values = all(a is not None and b is not None for a, b in pairs)
    rel = [abs(b - a) / abs(a) for a, b in pairs] if ok_values else []
    tol = LOSS_RTOL[dtype]
    return {"pass": ok_values and bool(rel) and max(rel) <= tol, "rtol": tol, "max_rel_diff": max(rel) if rel else None,
            "cpu_fp32": ref["losses"], "device": dev["losses"], "device_run": {k: dev[k] for k in dev if k != "losses"}}


def check_rows(ref_rows: dict, dev_rows: dict, dev_dtype) -> dict:
    import torch

    out: dict = {"pass": True}
    for run, rows in (("cpu_fp32", ref_rows), ("device", dev_rows)):
        for name, before in rows["before"].items():
            after = rows["after"][name]
            short = name.replace("base_model.model.", "")
            if name.endswith("weight_base"):
                same = torch.equal(before, after)
                out[f"{run}: {short} unchanged bit for bit"] = same
                out["pass"] &= same
            else:
                moved = not torch.equal(before, after)
                out[f"{run}: {short} trained (moved)"] = moved
                out["pass"] &= moved
    for name, cpu in ref_rows["before"].items():
        if name.endswith("weight_base"):
            same = torch.equal(dev_rows["after"][name], cpu.to(dev_dtype))
            out[f"device rows = cpu fp32 rows cast to {dev_dtype}: {name.replace('base_model.model.', '')}"] = same
            out["pass"] &= same
    return out


def check_fused(device: str, dtype_name: str) -> dict:
    import torch

    from cllama_dist.model.loss import fused_kernel_available, reference_cross_entropy, split_linear_cross_entropy

    cuda = device.startswith("cuda")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    truth_dtype = torch.float32 if cuda else torch.float64
    # The benchmark's head (H 2,048, 32,000 + 17,953 rows) on the device; a small one on the CPU.
    n, h, v0, v1 = (8192, 2048, 32000, 17953) if cuda else (512, 64, 1000, 200)
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) * 1.0).to(device)
    w_base = (torch.randn(v0, h, generator=g) * h ** -0.5).to(device)
    w_new = (torch.randn(v1, h, generator=g) * h ** -0.5).to(device)
    labels = torch.randint(0, v0 + v1, (n,), generator=g).to(device)
    labels[::7] = -100  # ignored positions, as in instruction tuning

    def run(fn, dt, **kw):
        # copy=True: fresh leaves for every run (a .to() to the same dtype would share, and accumulate, grads)
        hh = hidden.to(dt, copy=True).requires_grad_(True)
        wb = w_base.to(dt, copy=True)  # frozen
        wn = w_new.to(dt, copy=True).requires_grad_(True)
        nll, count = fn(hh, [wb, wn], labels, **kw)
        nll.backward()
        return nll.detach().double(), hh.grad.double(), wn.grad.double()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    def truth_ce(hh, ws, lab):  # the unfused loss with the logits in the truth dtype (reference_ upcasts to fp32)
        logits = torch.cat([torch.nn.functional.linear(hh, w) for w in ws], dim=-1).to(truth_dtype)
        return torch.nn.functional.cross_entropy(logits, lab, ignore_index=-100, reduction="sum"), None

    truth = run(truth_ce, truth_dtype)
    unfused = run(reference_cross_entropy, dtype)
    results = {"shape": {"tokens": n, "hidden": h, "rows": [v0, v1]}, "dtype": dtype_name}
    slack, floor = FUSED_TOL[dtype_name]
    ok = True
    backends = ["torch"] + ([fused_kernel_available(device)] if fused_kernel_available(device) else [])
    for backend in backends:
        fused = run(split_linear_cross_entropy, dtype, backend=backend)
        r = {}
        for i, what in enumerate(("loss", "grad_hidden", "grad_new_rows")):
            e_f, e_u = rel(fused[i], truth[i]), rel(unfused[i], truth[i])
            passed = e_f <= slack * e_u + floor
            r[what] = {"fused_vs_truth": e_f, "unfused_vs_truth": e_u, "fused_vs_unfused": rel(fused[i], unfused[i]),
                       "pass": passed}
            ok &= passed
        results[backend] = r
    results["pass"] = ok
    return results


def check_copier(device: str, data: str, dtype_name: str) -> dict:
    import numpy as np
    import torch

    from cllama_dist.data.shards import load_manifest
    from cllama_dist.trainer.batches import DeviceCopier, model_inputs, open_data

    blocks = open_data(data, load_manifest(data), "train")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]

    def convert(rows):
        return model_inputs(rows, device, "sdpa", dtype)

    batches = [blocks.rows(np.arange(2 * i, 2 * i + 2)) for i in range(4)]
    copier = DeviceCopier(convert, device, ahead=1)
    got = [(rows, copier.take(rows)) for rows in copier.stream(iter(batches))]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    in_order = [r for r, _ in got] == batches
    equal = all(torch.equal(t["input_ids"].cpu(), torch.from_numpy(r["input_ids"])) for r, t in got)
    on_device = all(t["input_ids"].device.type == torch.device(device).type for _, t in got)
    return {"pass": in_order and equal and on_device, "in_order": in_order, "equal": equal, "on_device": on_device}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="everything on the CPU in fp32, tiny inputs built here")
    p.add_argument("--tokenizer", help="the merged tokenizer (.gpu/merged)")
    p.add_argument("--shards", help="shards of the fixture corpus (.gpu/shards512)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--out", default="bench/out/correctness")
    p.add_argument("--run-timeout-s", type=float, default=150.0)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return train_worker(*args.worker)

    import torch

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        from train_throughput import tiny_inputs

        model_config, tokenizer, shards = tiny_inputs(out / "tiny-inputs")
        data, seq, device, dtype = shards[64], 64, "cpu", "fp32"
    else:
        if not (args.tokenizer and args.shards):
            p.error("give --tokenizer and --shards (or --cpu)")
        if not torch.cuda.is_available():
            p.error("no CUDA device here (use --cpu)")
        model_config, tokenizer, data, seq, device, dtype = MODEL_SMALL, args.tokenizer, args.shards, args.seq, "cuda", "bf16"
    report: dict = {"mode": "cpu (dry run: fp32 on both sides)" if args.cpu else "gpu", "checks": {}}
    with tempfile.TemporaryDirectory(prefix="corr-") as tmp:
        work = Path(tmp)
        spec = _spec("", model_config, tokenizer, data, seq, "fp32")
        ref, ref_rows, err_ref = run_training(work, spec, cpu=True, timeout=args.run_timeout_s)
        dev, dev_rows, err_dev = run_training(work, {**spec, "dtype": dtype}, cpu=args.cpu, timeout=args.run_timeout_s)
        for log in work.glob("*.log"):
            (out / log.name).write_text(log.read_text(errors="replace"))
    if ref and dev:
        report["checks"]["losses"] = check_losses(ref, dev, dtype)
        report["checks"]["old_rows"] = check_rows(ref_rows, dev_rows, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    else:
        report["checks"]["losses"] = report["checks"]["old_rows"] = {"pass": False, "error": err_ref or err_dev}
    report["checks"]["fused"] = check_fused(device if not args.cpu else "cpu", dtype)
    report["checks"]["copier"] = check_copier("cuda" if not args.cpu else "cpu", data, dtype)
    report["pass"] = all(c.get("pass") for c in report["checks"].values())
    report["wall_s"] = round(time.time() - t0, 1)
    (out / "correctness.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for name, c in report["checks"].items():
        detail = {"losses": lambda: f"max relative difference {c.get('max_rel_diff')} (rtol {c.get('rtol')})",
                  "fused": lambda: ", ".join(f"{b} {w} {c[b][w]['fused_vs_truth']:.2e} vs unfused "
                                             f"{c[b][w]['unfused_vs_truth']:.2e}" for b in c if isinstance(c[b], dict)
                                             and "loss" in c[b] for w in ("loss", "grad_hidden", "grad_new_rows")),
                  "old_rows": lambda: f"{sum(1 for k, v in c.items() if k != 'pass' and v)} of "
                                      f"{sum(1 for k in c if k != 'pass')} row checks hold",
                  "copier": lambda: f"in order {c['in_order']}, equal {c['equal']}, on the device {c['on_device']}"}
        print(f"{'PASS' if c.get('pass') else 'FAIL'} {name}: {detail[name]() if name in detail and 'error' not in c else c.get('error', '')}")
    print(f"correctness.json in {out} ({report['wall_s']} s)")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
