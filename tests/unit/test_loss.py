"""split_linear_cross_entropy against the unfused reference (cat + fp32 F.cross_entropy).

Values and gradients must agree on random data over shapes the training step meets (labels in every
part, ignored positions, chunks that do not divide N, one to three parts, frozen parts), float64
gradcheck, bf16 inputs, and the property the function exists for: no tensor of N x V' elements is
ever produced, while the reference does produce one.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cllama_dist.model.loss import (
    default_chunk_tokens,
    fused_kernel_available,
    reference_cross_entropy,
    split_linear_cross_entropy,
)

IGNORE = -100


def make_case(n: int, h: int, sizes: list[int], trainable: list[bool], ignore_every: int = 4, seed: int = 0,
              dtype: torch.dtype = torch.float32, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype).requires_grad_(True)
    weights = [(torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_(t) for v, t in zip(sizes, trainable)]
    total = sum(sizes)
    labels = torch.randint(0, total, (n,), generator=g)
    # Labels in every part for sure: the first positions point into each part in turn.
    off = 0
    for i, v in enumerate(sizes):
        labels[i] = off + (i * 7) % v
        off += v
    if ignore_every:
        labels[len(sizes)::ignore_every] = IGNORE
    return hidden, weights, labels


def grads(loss: torch.Tensor, hidden: torch.Tensor, weights: list[torch.Tensor], upstream: float = 1.0):
    wrt = [hidden] + [w for w in weights if w.requires_grad]
    return torch.autograd.grad(loss, wrt, grad_outputs=torch.tensor(upstream, dtype=loss.dtype))


CASES = [
    # n, h, part sizes, trainable parts, chunk
    pytest.param(37, 8, [20, 11], [False, True], 7, id="base+new,chunk-not-dividing"),
    pytest.param(37, 8, [20, 11], [True, True], 5, id="both-trainable"),
    pytest.param(40, 6, [50], [True], 16, id="single-part"),
    pytest.param(23, 5, [13, 7, 9], [False, True, True], 5, id="three-parts"),
    pytest.param(23, 5, [13, 7, 9], [True, False, True], 4, id="three-parts-middle-frozen"),
    pytest.param(30, 8, [20, 11], [False, True], 1000, id="chunk>N"),
    pytest.param(9, 4, [6, 3], [False, True], 1, id="chunk=1"),
    pytest.param(64, 16, [40, 25], [False, True], None, id="default-chunk"),
]


@pytest.mark.parametrize("n,h,sizes,trainable,chunk", CASES)
def test_fp32_matches_reference(n, h, sizes, trainable, chunk):
    hidden, weights, labels = make_case(n, h, sizes, trainable, scale=3.0)
    nll, n_valid = split_linear_cross_entropy(hidden, weights, labels, chunk_tokens=chunk)
    ref, ref_valid = reference_cross_entropy(hidden, weights, labels)
    assert nll.dtype == torch.float32 and nll.dim() == 0
    assert n_valid.dtype == torch.int64 and n_valid.dim() == 0 and not n_valid.requires_grad
    assert int(n_valid) == int(ref_valid) == int((labels != IGNORE).sum())
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=0)
    # A non-unit upstream gradient, as a caller dividing by the global token count produces.
    got = grads(nll, hidden, weights, upstream=0.37)
    want = grads(ref, hidden, weights, upstream=0.37)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_part_gets_no_grad_and_trainable_part_does():
    hidden, weights, labels = make_case(37, 8, [20, 11], [False, True])
    nll, n_valid = split_linear_cross_entropy(hidden, weights, labels, chunk_tokens=6)
    (nll / n_valid).backward()
    assert weights[0].grad is None
    ref_w = weights[1].detach().clone().requires_grad_(True)
    ref_h = hidden.detach().clone().requires_grad_(True)
    ref, ref_n = reference_cross_entropy(ref_h, [weights[0], ref_w], labels)
    (ref / ref_n).backward()
    torch.testing.assert_close(weights[1].grad, ref_w.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(hidden.grad, ref_h.grad, rtol=1e-4, atol=1e-7)


def test_only_weights_or_only_hidden_need_grad():
    hidden, weights, labels = make_case(21, 6, [10, 8], [False, True])
    h_const = hidden.detach()
    nll, _ = split_linear_cross_entropy(h_const, weights, labels, chunk_tokens=4)
    ref, _ = reference_cross_entropy(h_const, weights, labels)
    torch.testing.assert_close(torch.autograd.grad(nll, weights[1]), torch.autograd.grad(ref, weights[1]),
                               rtol=1e-4, atol=1e-7)
    frozen = [w.detach() for w in weights]
    nll, _ = split_linear_cross_entropy(hidden, frozen, labels, chunk_tokens=4)
    ref, _ = reference_cross_entropy(hidden, frozen, labels)
    torch.testing.assert_close(torch.autograd.grad(nll, hidden), torch.autograd.grad(ref, hidden),
                               rtol=1e-4, atol=1e-7)


def test_all_positions_ignored():
    hidden, weights, labels = make_case(17, 6, [10, 8], [False, True])
    labels = torch.full_like(labels, IGNORE)
    nll, n_valid = split_linear_cross_entropy(hidden, weights, labels, chunk_tokens=5)
    assert int(n_valid) == 0 and float(nll.detach()) == 0.0
    g_h, g_w = grads(nll, hidden, weights)
    assert torch.count_nonzero(g_h) == 0 and torch.count_nonzero(g_w) == 0


def test_custom_ignore_index():
    hidden, weights, labels = make_case(19, 6, [10, 8], [False, True], ignore_every=0)
    labels[5::3] = -1
    nll, n_valid = split_linear_cross_entropy(hidden, weights, labels, chunk_tokens=4, ignore_index=-1)
    ref, ref_valid = reference_cross_entropy(hidden, weights, labels, ignore_index=-1)
    assert int(n_valid) == int(ref_valid)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=0)


def test_label_out_of_range_poisons_the_loss():
    # No host sync may check labels, so a bad label must not be silently wrong: the loss is NaN.
    hidden, weights, labels = make_case(10, 4, [6, 3], [False, True])
    labels[3] = 9  # == V', one past the end
    nll, _ = split_linear_cross_entropy(hidden, weights, labels, chunk_tokens=4)
    assert torch.isnan(nll)


def test_float64_gradcheck():
    hidden, weights, labels = make_case(7, 3, [4, 3], [True, True], ignore_every=3, dtype=torch.float64)

    def f(h, w0, w1):
        return split_linear_cross_entropy(h, [w0, w1], labels, chunk_tokens=3)[0]

    assert torch.autograd.gradcheck(f, (hidden, *weights), eps=1e-6, atol=1e-7, rtol=1e-5)

    def f3(h, w0, w2):  # three parts, the middle one frozen
        return split_linear_cross_entropy(h, [w0, mid, w2], labels3, chunk_tokens=2)[0]

    mid = torch.randn(2, 3, dtype=torch.float64)
    labels3 = labels.clone()
    labels3[0] = 5  # in the middle part
    assert torch.autograd.gradcheck(f3, (hidden, weights[0], weights[1]), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_bf16_within_bf16_tolerance_of_fp32_reference():
    """bf16 hidden and weights, no autocast.

    Tolerance: the logits GEMM rounds its output to bf16 (8 significant bits, relative error up to
    2^-9 = 0.2 %), exactly as the unfused bf16 path does before its .float(); the softmax and the sum
    run in fp32. The gradients are rounded to bf16 before their GEMMs and the outputs are bf16. So the
    loss is checked at 1 % relative and the gradients at 2 % of their largest element against the fp32
    reference on the same (bf16-representable) values, and tighter against the bf16 reference, which
    takes the same roundings.
    """
    hidden, weights, labels = make_case(96, 32, [60, 37], [False, True], seed=3, dtype=torch.bfloat16, scale=2.0)
    nll, n_valid = split_linear_cross_entropy(hidden, weights, labels, chunk_tokens=25)
    assert nll.dtype == torch.float32
    g_h, g_w = grads(nll, hidden, weights)
    assert g_h.dtype == torch.bfloat16 and g_w.dtype == torch.bfloat16

    h32 = hidden.detach().float().requires_grad_(True)
    w32 = [w.detach().float().requires_grad_(w.requires_grad) for w in weights]
    ref32, _ = reference_cross_entropy(h32, w32, labels)
    r_h, r_w = grads(ref32, h32, w32)
    torch.testing.assert_close(nll, ref32, rtol=1e-2, atol=0)
    for got, want in ((g_h, r_h), (g_w, r_w)):
        assert (got.float() - want).abs().max() <= 2e-2 * want.abs().max()

    ref16, _ = reference_cross_entropy(hidden, weights, labels)
    b_h, b_w = grads(ref16, hidden, weights)
    torch.testing.assert_close(nll, ref16, rtol=2e-3, atol=0)
    for got, want in ((g_h, b_h), (g_w, b_w)):
        assert (got.float() - want.float()).abs().max() <= 1e-2 * want.float().abs().max()


class _Recorder(TorchDispatchMode):
    """Records the largest tensor any aten op produces, and whether any op read a value to the host."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.host_reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            self.host_reads.append(str(func))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def _record(fn, hidden, weights, labels):
    with _Recorder() as rec:
        nll, n_valid = fn(hidden, weights, labels)
        (nll / n_valid).backward()
    return rec


def test_never_allocates_the_full_logits():
    n, h, sizes, chunk = 512, 16, [300, 200], 64
    hidden, weights, labels = make_case(n, h, sizes, [False, True])
    full = n * sum(sizes)  # 256,000 elements
    ours = _record(lambda *a: split_linear_cross_entropy(*a, chunk_tokens=chunk), hidden, weights, labels)
    # The largest thing the chunked loss may make: one chunk of one part's logits, the hidden gradient,
    # or a weight-sized gradient buffer.
    allowed = max(chunk * max(sizes), n * h, max(sizes) * h)
    assert ours.max_numel <= allowed < full // 4
    hidden.grad = None
    weights[1].grad = None
    ref = _record(reference_cross_entropy, hidden, weights, labels)
    assert ref.max_numel >= full  # the recorder does see the reference's full logits


def test_no_host_sync_in_forward_or_backward():
    hidden, weights, labels = make_case(50, 8, [20, 11], [False, True])
    rec = _record(lambda *a: split_linear_cross_entropy(*a, chunk_tokens=7), hidden, weights, labels)
    assert rec.host_reads == []


def test_default_chunk_follows_the_vocabulary():
    assert default_chunk_tokens(49_953) == 256 * 2**20 // (4 * 49_953) == 1343
    assert default_chunk_tokens(2 * 49_953) == 671
    assert default_chunk_tokens(10**12) == 1


def test_backends_on_cpu():
    hidden, weights, labels = make_case(20, 6, [10, 8], [False, True])
    assert fused_kernel_available("cpu") is None
    auto, _ = split_linear_cross_entropy(hidden, weights, labels, backend="auto", chunk_tokens=6)
    torch_, _ = split_linear_cross_entropy(hidden, weights, labels, backend="torch", chunk_tokens=6)
    assert torch.equal(auto, torch_)
    for backend in ("liger", "cce"):
        with pytest.raises(ValueError, match="CUDA only"):
            split_linear_cross_entropy(hidden, weights, labels, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        split_linear_cross_entropy(hidden, weights, labels, backend="triton")


def test_shape_and_dtype_errors():
    hidden, weights, labels = make_case(10, 4, [6, 3], [False, True])
    with pytest.raises(TypeError, match="dtype|bfloat16"):
        split_linear_cross_entropy(hidden, [weights[0], weights[1].detach().bfloat16()], labels)
    with pytest.raises(ValueError, match="flatten"):
        split_linear_cross_entropy(hidden.detach().view(2, 5, 4), weights, labels)
    with pytest.raises(ValueError, match="ZeRO-3"):  # a partitioned weight outside its forward
        split_linear_cross_entropy(hidden, [weights[0], torch.empty(0)], labels)
    with pytest.raises(ValueError, match="at least one"):
        split_linear_cross_entropy(hidden, [], labels)
