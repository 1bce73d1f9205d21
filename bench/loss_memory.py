"""Peak memory of the LM-head loss: today's cat + transformers loss against the chunked split loss.

    nice -n 10 python3 bench/loss_memory.py [--out bench/out/loss_memory.json]

Shape: 8 x 2,048 tokens, hidden 2,048, V = 32,000 frozen base rows + 17,953 trainable new rows
(V' = 49,953), hidden requires grad; one forward + backward per variant:
  today    ``SplitLMHead`` (``cat([F.linear(h, W_base), F.linear(h, W_new)], -1)``) then transformers'
           ``ForCausalLMLoss`` (upcast to float, shift, F.cross_entropy mean), as LlamaForCausalLM runs
           it; the logits die with the model output before backward, as in the trainer's
           ``self.engine(...).loss``.
  chunked  ``split_linear_cross_entropy`` on the flattened hidden states and the same shifted labels,
           divided by its valid count (the same mean, so the same gradients).

fp32 on the CPU: this machine's CPU path for bf16 GEMMs is far slower than fp32, and fp32 is also
the dtype in which both losses hold their logits (today's path upcasts them), so the sizes measured
are the ones that matter; on a GPU in bf16 today's path additionally holds the bf16 logits.

Each variant runs in a fresh subprocess so that its peak is its own. Peak = VmHWM from
/proc/self/status after resetting it (``echo 5 > /proc/self/clear_refs``) once the inputs are
allocated and touched, minus VmRSS at that moment: the increase caused by the loss alone. Where the
reset is not possible, ru_maxrss (the lifetime peak) is used instead and the JSON says so. Large
tensors are mmap'd by the allocator and returned to the OS when freed, so RSS tracks live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, commit

VARIANTS = ("today", "chunked")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> str:
    """Reset VmHWM to the current RSS; returns the measure the peak will be read with."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM after clear_refs"
    except OSError:
        return "ru_maxrss (lifetime peak; reset not possible)"


def _peak_kb(how: str) -> int:
    if how.startswith("VmHWM"):
        return _status_kb("VmHWM")
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    b, t, h, v, vn = args.batch, args.seq, args.hidden, args.base_rows, args.new_rows
    hidden = torch.randn(b, t, h, requires_grad=True)
    w_base = torch.randn(v, h) * 0.02  # frozen
    w_new = (torch.randn(vn, h) * 0.02).requires_grad_(True)
    labels = torch.randint(0, v + vn, (b, t))
    if args.variant == "today":
        from torch import nn

        from cllama_dist.model.vocab import SplitLMHead

        try:
            from transformers.loss.loss_utils import ForCausalLMLoss
            loss_source = "transformers.loss.loss_utils.ForCausalLMLoss"
        except ImportError:  # older transformers: the same steps, replicated
            loss_source = "replicated ForCausalLMLoss steps (transformers has no loss_utils)"

            def ForCausalLMLoss(logits, labels, vocab_size, ignore_index=-100):  # noqa: N802
                logits = logits.float()
                shift = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
                return nn.functional.cross_entropy(logits.view(-1, vocab_size), shift.view(-1),
                                                   ignore_index=ignore_index, reduction="mean")

        head = SplitLMHead(w_base, w_new.detach().requires_grad_(True), v, v + vn)
        w_new = head.weight_new

        def step():
            # As in LlamaForCausalLM.forward + the trainer's `engine(...).loss`: the logits live as long
            # as the forward, then only autograd's saved tensors remain for backward.
            loss = ForCausalLMLoss(head(hidden), labels, vocab_size=v + vn)
            loss.backward()
            return loss
    else:
        from torch import nn

        from cllama_dist.model.loss import default_chunk_tokens, split_linear_cross_entropy

        loss_source = (f"cllama_dist.model.loss.split_linear_cross_entropy, chunk "
                       f"{args.chunk_tokens or default_chunk_tokens(v + vn)} tokens")

        def step():
            shift = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
            nll, n_valid = split_linear_cross_entropy(hidden.view(-1, h), [w_base, w_new], shift,
                                                      chunk_tokens=args.chunk_tokens)
            loss = nll / n_valid
            loss.backward()
            return loss

    base_kb = _status_kb("VmRSS")
    how = _reset_peak()
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak_kb = _peak_kb(how)
    return {"variant": args.variant, "loss_source": loss_source, "peak_measure": how,
            "baseline_rss_mb": round(base_kb / 1024, 1), "peak_rss_mb": round(peak_kb / 1024, 1),
            "peak_increase_mb": round((peak_kb - base_kb) / 1024, 1), "seconds": round(seconds, 1),
            "loss": float(loss.detach()), "grad_hidden_norm": float(hidden.grad.norm()),
            "grad_w_new_norm": float(w_new.grad.norm()), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out/loss_memory.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--base-rows", type=int, default=32_000)
    ap.add_argument("--new-rows", type=int, default=17_953)
    ap.add_argument("--chunk-tokens", type=int, default=None, help="default: the loss's own default")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    passthrough = ["--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden),
                   "--base-rows", str(args.base_rows), "--new-rows", str(args.new_rows)]
    if args.chunk_tokens:
        passthrough += ["--chunk-tokens", str(args.chunk_tokens)]
    results = []
    for variant in args.variants:
        out = subprocess.run([sys.executable, __file__, "--variant", variant, *passthrough], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"variant {variant} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.split("RESULT ", 1)[1]))
        print(json.dumps(results[-1]), flush=True)

    tokens, vocab = args.batch * args.seq, args.base_rows + args.new_rows
    meta = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "torch": results[0]["torch"],
            "commit": commit(), "date": time.strftime("%Y-%m-%d"),
            "shape": {"tokens": tokens, "hidden": args.hidden, "base_rows": args.base_rows,
                      "new_rows": args.new_rows, "dtype": "float32", "device": "cpu"},
            "one_fp32_logits_mb": round(tokens * vocab * 4 / 2**20, 1)}
    by = {r["variant"]: r for r in results}
    if "today" in by and "chunked" in by:
        a, b = by["today"], by["chunked"]
        meta["memory_ratio"] = round(a["peak_increase_mb"] / max(b["peak_increase_mb"], 1e-9), 1)
        meta["target_ratio"] = 4.0
        meta["meets_target"] = meta["memory_ratio"] >= 4.0
        meta["loss_rel_diff"] = abs(a["loss"] - b["loss"]) / abs(a["loss"])
        meta["grad_hidden_norm_rel_diff"] = abs(a["grad_hidden_norm"] - b["grad_hidden_norm"]) / a["grad_hidden_norm"]
        meta["grad_w_new_norm_rel_diff"] = abs(a["grad_w_new_norm"] - b["grad_w_new_norm"]) / a["grad_w_new_norm"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")

    print(f"\nmachine: {meta['machine']}; torch {meta['torch']}; commit {meta['commit']}; {meta['date']}")
    print(f"shape: {tokens:,} tokens x hidden {args.hidden:,}, V = {args.base_rows:,} frozen + "
          f"{args.new_rows:,} trainable rows, fp32 on the CPU; one fp32 N x V' tensor = "
          f"{meta['one_fp32_logits_mb']:,} MiB; peak measure: {results[0]['peak_measure']}")
    print("| variant | peak RSS increase MiB | seconds (fwd+bwd) | loss | loss source |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['peak_increase_mb']:,} | {r['seconds']} | {r['loss']:.6f} | {r['loss_source']} |")
    if "memory_ratio" in meta:
        print(f"\nmemory ratio today / chunked: {meta['memory_ratio']}x (target >= 4x: "
              f"{'met' if meta['meets_target'] else 'NOT met'}); loss relative difference "
              f"{meta['loss_rel_diff']:.2e}, grad-norm relative differences hidden "
              f"{meta['grad_hidden_norm_rel_diff']:.2e}, W_new {meta['grad_w_new_norm_rel_diff']:.2e}")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
