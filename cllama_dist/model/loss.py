"""Cross-entropy over the split LM head without materialising the (tokens x V') logits.

Why: ``SplitLMHead`` today returns ``cat([h @ W_base^T, h @ W_new^T])`` and transformers' loss then
upcasts it to fp32 and log-softmaxes it. For one micro-batch of 8 x 2,048 tokens and V' = 49,953
columns, one fp32 copy of the logits is 16,384 x 49,953 x 4 B = 3.27 GB, and the loss holds several
such copies at once (below). ``split_linear_cross_entropy`` computes the same summed NLL and the same
gradients a chunk of tokens at a time, so its working memory is O(chunk x V') instead of O(N x V').

How (a ``torch.autograd.Function``):
  forward   for each chunk of tokens and each part W_i: logits = h @ W_i^T in the input dtype (a bf16
            GEMM on the GPU), upcast to fp32, fold into a running log-sum-exp (``logaddexp`` of each
            part's own stable lse: no concatenation), and pick the target logit from the part that
            holds the label. Saved for backward: hidden, labels, the weights, and lse (N fp32).
  backward  recompute each chunk's logits, p = exp(logit - lse) in fp32, subtract 1 at the target,
            zero ignored rows, scale by the incoming gradient; then grad_h += p @ W_i for every part
            and grad_W_i += p^T @ h only for parts that require grad (the frozen base costs no
            weight-gradient GEMM).
  The price is one extra head GEMM per step (the recompute): for 7B (H = 4,096, V' = 49,953) about
  2 x 4,096 x 49,953 = 0.41 GFLOP per token against ~40 GFLOP per token for the whole training step,
  i.e. about 1 %.

Memory, by arithmetic, for the benchmark's shape (bench/loss_memory.py: N = 8 x 2,048 = 16,384
tokens, H = 2,048, V = 32,000 frozen + 17,953 trainable rows, fp32 on the CPU), written down before
the chunked path was:
  today's path (cat + transformers ForCausalLMLoss), one N x V' fp32 tensor L = 3.27 GB:
    forward: the two part logits (2.10 + 1.18 GB) and their cat (3.27 GB) coexist: 2 L; then the cat
    and the log-softmax output: 2 L. Backward: the saved log-softmax output, nll_loss's gradient
    w.r.t. it and log_softmax's gradient w.r.t. the logits: 3 L = 9.8 GB, plus grad_h (0.13 GB) and
    grad W_new (0.15 GB). Expected peak over the inputs: ~10 GB.
  chunked path, default chunk = 256 MiB / (4 B x 49,953) = 1,343 tokens (13 chunks):
    forward: one part's fp32 chunk logits at a time, 1,343 x 32,000 x 4 B = 172 MB, plus reductions'
    temporaries of the same size at most: ~0.35 GB. Backward: the chunk's logits turned into p in
    place (172 MB) plus the outputs grad_h (0.13 GB) and grad W_new (0.15 GB; fp32 weights accumulate
    in place into it): ~0.5 GB. Expected peak: ~0.5 GB, i.e. ~20x lower than today (target: >= 4x).
  What it did (bench/loss_memory.py at commit 0d33d80, 2026-12-02, AMD EPYC 2 cores, torch 2.13.0
  CPU; peak = VmHWM increase over the RSS after the inputs): today 9,382.5 MiB (3.0 x one N x V'
  fp32 tensor of 3,122 MiB, as predicted), chunked 470.6 MiB: 19.9x lower. Same loss to 8.5e-8
  relative; forward + backward 60.9 s today, 65.0 s chunked (the recompute costs less than the
  full-size elementwise passes it removes).

Default chunk size: ``DEFAULT_CHUNK_BYTES`` (256 MiB) of fp32 logits across all parts, i.e.
``chunk = 256 MiB // (4 * V')`` tokens. The working set per chunk is one part at a time and at most a
few such part-sized buffers, so it stays in the hundreds of MB whatever N is, while each GEMM still
has >= 1,000 rows (enough to keep a GPU's tensor cores busy). It derives from V', not a constant, so
a larger vocabulary gets proportionally fewer tokens per chunk.

Gradient accumulation for the weights is in fp32 and cast to the weight's dtype once at the end: a
bf16 buffer would round after every chunk (13 roundings for the shape above) where the unfused GEMM
rounds once; fp32 costs one transient buffer of the trainable part's size (for 7B: 17,953 x 4,096
x 4 B = 294 MB), small next to the GBs saved. For fp32 weights the buffer *is* the gradient.

Under DeepSpeed ZeRO-3 this Function is meant to be called inside ``SplitLMHead.forward``: ZeRO's
module hooks gather the weights before that forward, partition them after it, and gather them again
before the module's backward (the pre-backward hook sits on the module's outputs, which are this
Function's outputs, so it runs before ``backward`` here). That works only because the Parameter
objects themselves are saved through ``ctx.save_for_backward``: ZeRO swaps their ``.data`` in and
out, and a saved Parameter sees the re-gathered values. A ``detach()``-ed or copied weight would keep
the forward-time storage alive (or point at a freed buffer). So: no other references are kept, and
the weights are never detached or copied here. Gradients for the weights leave ``backward`` as its
outputs, so they reach the parameters through autograd's AccumulateGrad, where ZeRO's reduce hooks
are registered.

No host synchronisation anywhere (hazard H18): no ``.item()``, no Python branch on tensor values; the
loops run over shapes only. A label outside [0, V') that is not ``ignore_index`` cannot be checked
without a sync, so it makes the loss NaN instead of silently wrong (the target logit starts as NaN
and only a part that holds the label overwrites it), which the trainer's non-finite check catches.
"""

from __future__ import annotations

import functools
import importlib
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

Backend = Literal["auto", "torch", "liger", "cce"]

DEFAULT_CHUNK_BYTES = 256 * 2**20


def default_chunk_tokens(total_vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that one chunk's fp32 logits over all ``total_vocab`` columns are ~chunk_bytes."""
    return max(1, chunk_bytes // (4 * max(1, total_vocab)))


def _check_inputs(hidden: torch.Tensor, weights: Sequence[torch.Tensor], labels: torch.Tensor) -> None:
    # Shape and dtype checks only: they read metadata, never tensor values (no host sync).
    if len(weights) == 0:
        raise ValueError("split_linear_cross_entropy needs at least one weight matrix")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H); got shape {tuple(hidden.shape)} (flatten batch x time first)")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must be (N,) = ({hidden.shape[0]},); got shape {tuple(labels.shape)}")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != hidden.shape[1] or w.shape[0] == 0:
            # A ZeRO-3 partition outside its module's forward has shape (0,) (hazard H1).
            raise ValueError(f"weight part {i} must be (V_{i} >= 1, {hidden.shape[1]}); got shape {tuple(w.shape)}"
                             " (a ZeRO-3 weight is only whole inside its module's forward)")
        if w.dtype != hidden.dtype:
            raise TypeError(f"weight part {i} is {w.dtype} but hidden is {hidden.dtype}; the GEMMs run in one dtype")


def _part_target(labels: torch.Tensor, offset: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each label falls in the part [offset, offset + rows), its clamped local column)."""
    local = labels - offset
    inside = (local >= 0) & (local < rows)
    return inside, local.clamp(0, rows - 1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 / bf16 / fp16 inputs; fp64 stays fp64 (so that float64 gradcheck sees float64 maths)."""
    return torch.promote_types(dtype, torch.float32)


def _acc_mm(out32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out32 += a @ b, the GEMM in a's and b's dtype, the accumulation in out32's (fp32) dtype."""
    if a.dtype == out32.dtype:
        out32.addmm_(a, b)  # fp32: in place, no temporary
    else:
        # Low precision: the GEMM runs in bf16 (fp32 accumulation inside it on the GPU), one rounding
        # of its result, then an in-place add that upcasts element-wise (no fp32 temporary).
        out32.add_(a @ b)


class _SplitLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, labels: torch.Tensor, chunk: int, ignore_index: int,
                *weights: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        acc = _acc_dtype(hidden.dtype)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        target = torch.empty(n, dtype=acc, device=hidden.device)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            lab = labels[s:s + chunk]
            run = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=hidden.device)
            # NaN until a part holds the label: an out-of-range label poisons the loss instead of
            # silently contributing lse - 0 (see the module docstring).
            tgt = torch.full((h.shape[0],), float("nan"), dtype=acc, device=hidden.device)
            offset = 0
            for w in weights:
                rows = w.shape[0]
                logits = (h @ w.t()).to(acc)  # a fresh tensor in every dtype, so in-place below is safe
                inside, col = _part_target(lab, offset, rows)
                picked = logits.gather(1, col.unsqueeze(1)).squeeze(1)
                tgt = torch.where(inside, picked, tgt)
                m = logits.amax(dim=1)
                part_lse = m + logits.sub_(m.unsqueeze(1)).exp_().sum(dim=1).log()
                run = torch.logaddexp(run, part_lse)
                del logits
                offset += rows
            lse[s:s + chunk] = run
            target[s:s + chunk] = tgt
        valid = labels != ignore_index
        # Per-token NLL, 0 at ignored positions: callers sum it (training) or keep it per row (validation,
        # instruction tuning's per-row sums); the backward takes a per-token incoming gradient either way.
        nll = torch.where(valid, lse - target, torch.zeros((), dtype=acc, device=hidden.device))
        # Only inputs and lse are saved; the weights are saved as the Parameter objects (ZeRO-3, above).
        ctx.save_for_backward(hidden, labels, lse, *weights)
        ctx.chunk = chunk
        ctx.ignore_index = ignore_index
        return nll

    @staticmethod
    @once_differentiable  # no double backward: a clear error instead of a silently wrong one
    def backward(ctx, grad_nll: torch.Tensor):
        hidden, labels, lse, *weights = ctx.saved_tensors
        need_h = ctx.needs_input_grad[0]
        need_w = list(ctx.needs_input_grad[4:])
        chunk = ctx.chunk
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulators for trainable parts (see the module docstring for why fp32).
        acc = lse.dtype
        grad_w32 = [torch.zeros(w.shape, dtype=acc, device=w.device) if need else None
                    for w, need in zip(weights, need_w)]
        g = grad_nll.to(acc)  # (N,): one incoming gradient per token (all equal for a summed loss)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            lab = labels[s:s + chunk]
            row_scale = (lab != ctx.ignore_index).to(acc) * g[s:s + chunk]  # zero for ignored rows
            gh32 = torch.zeros(h.shape, dtype=acc, device=h.device) if need_h else None
            offset = 0
            for w, gw32 in zip(weights, grad_w32):
                rows = w.shape[0]
                p = (h @ w.t()).to(acc)
                p.sub_(lse[s:s + chunk].unsqueeze(1)).exp_()  # softmax restricted to this part's columns
                inside, col = _part_target(lab, offset, rows)
                p.scatter_add_(1, col.unsqueeze(1), -inside.to(acc).unsqueeze(1))
                p.mul_(row_scale.unsqueeze(1))
                # The gradient GEMMs run in the weights' dtype, as the unfused path's do (its .float()
                # casts the logits' gradient back to bf16); cast once, and free the fp32 copy first.
                p_mm = p if p.dtype == w.dtype else p.to(w.dtype)
                del p
                if gh32 is not None:
                    _acc_mm(gh32, p_mm, w)
                if gw32 is not None:
                    _acc_mm(gw32, p_mm.t(), h)
                del p_mm
                offset += rows
            if grad_h is not None:
                grad_h[s:s + chunk] = gh32
        grad_ws = [None if gw32 is None else gw32.to(w.dtype) for w, gw32 in zip(weights, grad_w32)]
        return (grad_h, None, None, None, *grad_ws)


@functools.lru_cache(maxsize=None)
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # ImportError, or a kernel package whose own import fails (e.g. no triton)
        return False


def fused_kernel_available(device: torch.device | str) -> str | None:
    """"liger" or "cce" when that fused linear-cross-entropy package imports and ``device`` is CUDA, else None.

    Liger-Kernel is preferred when both are present (it needs no gradient filtering to be exact).
    """
    if torch.device(device).type != "cuda":
        return None
    if _importable("liger_kernel.transformers.functional"):
        return "liger"
    if _importable("cut_cross_entropy"):
        return "cce"
    return None


def _fused(kind: str, hidden: torch.Tensor, weights: Sequence[torch.Tensor], labels: torch.Tensor,
           ignore_index: int) -> torch.Tensor:
    """Summed NLL from a third-party fused kernel over the concatenated head.

    CHECKED FOR EQUALITY AGAINST ``reference_cross_entropy`` ON THE GPU BEFORE USE: neither package is
    installed on the development machines, so this path is not exercised by the unit tests. Cost of
    concatenating: a V' x H copy of the head per call (7B bf16: 49,953 x 4,096 x 2 B = 409 MB) and, as
    the kernels see one weight, a gradient for all V' rows of which the frozen base rows are dropped by
    cat's backward (wasted GEMM work on 32,000 of 49,953 rows, and their gradient buffer).
    """
    w = weights[0] if len(weights) == 1 else torch.cat(list(weights), dim=0)
    if kind == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, w, labels, ignore_index=ignore_index, reduction="sum").float()
    if kind == "cce":
        from cut_cross_entropy import linear_cross_entropy

        # filter_eps=None: no gradient filtering, so the gradients are exact rather than approximate.
        return linear_cross_entropy(hidden, w, labels, ignore_index=ignore_index, reduction="sum",
                                    filter_eps=None).float()
    raise ValueError(f"unknown fused kernel {kind!r}")


@functools.lru_cache(maxsize=None)
def fused_matches_reference(kind: str, device: str) -> tuple[bool, str]:
    """Whether fused kernel ``kind`` gives the pure-PyTorch path's loss and gradients on ``device`` (bf16, a
    small random problem with ignored positions, two parts of which the first is frozen), and the worst
    relative differences. Run once per process before the kernel is trusted (``resolve_kernel``)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    n, h, sizes = 512, 128, (640, 384)
    hidden = torch.randn(n, h, generator=g).to(device, torch.bfloat16)
    ws = [(torch.randn(v, h, generator=g) / h**0.5).to(device, torch.bfloat16) for v in sizes]
    labels = torch.randint(0, sum(sizes), (n,), generator=g).to(device)
    labels[::5] = -100
    results = []
    for fused in (True, False):
        hid = hidden.clone().requires_grad_(True)
        wts = [ws[0].clone(), ws[1].clone().requires_grad_(True)]
        if fused:
            loss = _fused(kind, hid, wts, labels, -100)
        else:
            loss = _SplitLinearCrossEntropy.apply(hid, labels, default_chunk_tokens(sum(sizes)), -100, *wts).sum()
        gh, gw = torch.autograd.grad(loss, [hid, wts[1]])
        results.append((loss.detach().float(), gh.float(), gw.float()))
    (lf, hf, wf), (lt, ht, wt) = results

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    diffs = (rel(lf, lt), rel(hf, ht), rel(wf, wt))
    # bf16 GEMMs in both: the tolerance is bf16's (8 bits of mantissa), not fp32's.
    ok = all(d == d and d < 2e-2 for d in diffs)
    return ok, f"loss {diffs[0]:.1e}, grad hidden {diffs[1]:.1e}, grad new rows {diffs[2]:.1e} relative"


def resolve_kernel(kernel: str, device: torch.device | str) -> tuple[str, str]:
    """The kernel a ``model.loss_kernel`` setting means on ``device`` and why: (torch | liger | cce, reason).

    auto: an installed fused kernel on CUDA after ``fused_matches_reference``, else the pure-PyTorch path
    (always on the CPU). liger / cce: that kernel, refused (ValueError) off CUDA or when it does not import.
    """
    dev = torch.device(device)
    if kernel == "torch":
        return "torch", "as configured"
    if kernel in ("liger", "cce"):
        if dev.type != "cuda":
            raise ValueError(f"the {kernel} loss kernel runs on CUDA only; this run is on {dev}")
        module = "liger_kernel.transformers.functional" if kernel == "liger" else "cut_cross_entropy"
        if not _importable(module):
            raise ValueError(f"the {kernel} loss kernel is not installed (cannot import {module})")
        return kernel, "as configured"
    if kernel != "auto":
        raise ValueError(f"unknown loss kernel {kernel!r}; expected auto, torch, liger or cce")
    kind = fused_kernel_available(dev)
    if kind is None:
        return "torch", "auto: no fused kernel installed" if dev.type == "cuda" else "auto: not on a GPU"
    ok, diffs = fused_matches_reference(kind, str(dev))
    if not ok:
        return "torch", f"auto: {kind} differs from the reference ({diffs}), not used"
    return kind, f"auto: {kind} checked against the reference ({diffs})"


def split_linear_cross_entropy(hidden: torch.Tensor, weights: Sequence[torch.Tensor], labels: torch.Tensor, *,
                               chunk_tokens: int | None = None, ignore_index: int = -100,
                               backend: Backend = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of ``labels`` under softmax(hidden @ cat(weights)^T), without building the full logits.

    Args:
      hidden: (N, H), fp32 or bf16; callers flatten batch x time and shift the labels themselves.
      weights: 1+ matrices (V_i, H) in hidden's dtype whose row-concatenation is the head (part 0 = base
        rows, part 1 = new rows). Parts with ``requires_grad=False`` get no gradient and no GEMM for one.
      labels: (N,) integer ids in [0, sum V_i) or ``ignore_index``.
      chunk_tokens: tokens per chunk; default ``default_chunk_tokens(sum V_i)`` (~256 MiB fp32 logits).
      backend: "torch" (this module's Function, the default), "liger" / "cce" (a fused kernel on CUDA,
        see ``_fused``: verified on the GPU against the reference before use), or "auto" (the fused
        kernel when ``fused_kernel_available(hidden.device)``, else "torch"; always "torch" on CPU).

    Returns (nll_sum, n_valid): the fp32 0-dim differentiable sum over valid positions (fp64 for fp64
    inputs, which only tests use), and the int64
    0-dim count of positions whose label is not ``ignore_index`` (no grad). Nothing is averaged: the
    caller normalises, e.g. by the valid tokens of the global batch.
    """
    _check_inputs(hidden, weights, labels)
    labels = labels.long()
    n_valid = (labels != ignore_index).sum()
    kind: str | None
    if backend == "auto":
        kind = fused_kernel_available(hidden.device)
    elif backend in ("liger", "cce"):
        if hidden.device.type != "cuda":
            raise ValueError(f"backend {backend!r} runs on CUDA only; hidden is on {hidden.device}")
        kind = backend
    elif backend == "torch":
        kind = None
    else:
        raise ValueError(f"unknown backend {backend!r}; expected auto, torch, liger or cce")
    if kind is not None:
        return _fused(kind, hidden, weights, labels, ignore_index), n_valid
    return split_linear_token_nll(hidden, weights, labels, chunk_tokens=chunk_tokens,
                                  ignore_index=ignore_index).sum(), n_valid


def split_linear_token_nll(hidden: torch.Tensor, weights: Sequence[torch.Tensor], labels: torch.Tensor, *,
                           chunk_tokens: int | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Per-token NLL (N,), fp32, 0 where the label is ``ignore_index``: the pure-PyTorch path of
    ``split_linear_cross_entropy`` before its sum, differentiable the same way (validation's per-row sums and
    instruction tuning's masked rows need it per token; a fused kernel's "sum" cannot give that)."""
    _check_inputs(hidden, weights, labels)
    total = sum(int(w.shape[0]) for w in weights)
    chunk = int(chunk_tokens) if chunk_tokens is not None else default_chunk_tokens(total)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1; got {chunk}")
    return _SplitLinearCrossEntropy.apply(hidden, labels.long(), chunk, ignore_index, *weights)


def reference_cross_entropy(hidden: torch.Tensor, weights: Sequence[torch.Tensor], labels: torch.Tensor,
                            ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused computation (what SplitLMHead + transformers' loss do), for tests and GPU checks.

    Builds the full (N, V') logits: only for small inputs or one-off equality checks.
    """
    logits = torch.cat([F.linear(hidden, w) for w in weights], dim=-1).float()
    labels = labels.long()
    nll = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return nll, (labels != ignore_index).sum()
