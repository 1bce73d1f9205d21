"""The chunked loss as the model computes it (model/adapters.install_loss_forward), against model.loss: hf.

Through the real tiny LLaMA with its split vocabulary and LoRA on the seven projections: losses and gradients
(of the new rows, of LoRA, of the old rows when they train) equal transformers' loss over the full logits
within fp32 rounding, for pre-training rows, instruction-tuning masks and packed rows; the per-row scores
of validation and ``cllama eval`` likewise; without labels the logits are the model's own, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cllama_dist.model.adapters import build_model, install_loss_forward, installed_loss
from cllama_dist.model.config import LoraConfig, ModelConfig
from cllama_dist.model.presets import TINY
from cllama_dist.model.scoring import causal_nll, masked_nll, summed_nll
from cllama_dist.trainer.batches import IGNORE, model_inputs

ORIG, NEW = 1000, 1337


def tiny(embeddings: str = "new-rows", attn: str = "sdpa"):
    cfg = ModelConfig(config={"vocab_size": ORIG, **TINY}, attn_implementation=attn, embeddings=embeddings,
                      new_row_init="normal")
    model, _ = build_model(cfg, LoraConfig(rank=4, dropout=0.0), 3, ORIG, NEW, torch.float32)
    # LoRA B starts at zero, which would make the LoRA-A gradients zero in both modes: give it values.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    x = torch.randint(0, NEW, (b, t), generator=torch.Generator().manual_seed(seed))
    x[0, :4] = torch.arange(NEW - 4, NEW)  # new-row targets for sure
    return x


def loss_and_grads(model, mode: str, fn):
    install_loss_forward(model, mode, "torch")
    model.zero_grad(set_to_none=True)
    loss = fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(hf, ours, rtol=2e-5):
    (l_hf, g_hf), (l_ours, g_ours) = hf, ours
    assert l_ours.dtype == torch.float32
    assert torch.allclose(l_ours, l_hf, rtol=1e-6, atol=1e-6), (l_ours, l_hf)
    assert g_hf.keys() == g_ours.keys()
    assert any("lora_A" in n for n in g_hf) and any("lm_head.weight_new" in n for n in g_hf)
    assert any("embed_tokens.weight_new" in n for n in g_hf)
    for n in g_hf:
        scale = g_hf[n].abs().max()
        assert scale > 0, n
        assert (g_ours[n] - g_hf[n]).abs().max() <= rtol * scale, n


@pytest.mark.parametrize("embeddings", ["new-rows", "full"])
def test_pretraining_loss_and_gradients_equal_hf(embeddings):
    model = tiny(embeddings)
    x = ids(3, 29)
    hf = loss_and_grads(model, "hf", lambda m: m(input_ids=x, labels=x).loss)
    ours = loss_and_grads(model, "chunked", lambda m: m(input_ids=x, labels=x).loss)
    assert_same(hf, ours)
    base = [n for n in hf[1] if n.endswith("weight_base")]
    # Old rows get a gradient only when they train (embeddings: full); new-rows leaves them frozen.
    assert (len(base) == 2) == (embeddings == "full")


def test_instruction_masks_and_the_trainer_scaling_equal_hf():
    model = tiny()
    x = ids(2, 31, seed=1)
    labels = x.clone()
    labels[0, :12] = IGNORE  # a prompt
    labels[1, :5] = IGNORE
    labels[1, 20:] = IGNORE  # padding after the response
    inputs = {"input_ids": x}

    def step_loss(m):  # what trainer/loop.py's micro_batch_loss computes for instruction tuning
        return summed_nll(m, inputs, labels) * (2 * 4 / 37)

    assert_same(loss_and_grads(model, "hf", step_loss), loss_and_grads(model, "chunked", step_loss))
    for mode in ("hf", "chunked"):
        install_loss_forward(model, mode, "torch")
        with torch.no_grad():
            per_row, count = masked_nll(model, inputs, labels)
        if mode == "hf":
            ref = (per_row, count)
    assert torch.equal(count, ref[1]) and count.tolist() == [19, 15]
    assert torch.allclose(per_row, ref[0], rtol=1e-6)


def test_packed_rows_equal_hf():
    model = tiny(attn="sdpa")
    from cllama_dist.model.packing import positions_from_segments

    seg = np.array([[0] * 10 + [1] * 12 + [2] * 7, [0] * 20 + [1] * 9], dtype=np.int32)
    x = ids(2, 29, seed=2).numpy()
    lab = x.copy()
    lab[seg == 1] = IGNORE  # example 1's tokens are its prompt
    rows = {"input_ids": x, "labels": lab, "segments": seg, "position_ids": positions_from_segments(seg)}
    inputs = model_inputs(rows, "cpu", "sdpa", torch.float32)
    assert "attention_mask" in inputs and "position_ids" in inputs
    labels = inputs.pop("labels")
    assert torch.equal(labels, torch.from_numpy(lab))
    hf = loss_and_grads(model, "hf", lambda m: summed_nll(m, inputs, labels))
    ours = loss_and_grads(model, "chunked", lambda m: summed_nll(m, inputs, labels))
    assert_same(hf, ours)


def test_validation_and_eval_scores_equal_hf_and_logits_are_unchanged():
    model = tiny().eval()
    x = ids(3, 17, seed=3)
    mask = torch.ones_like(x)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    with torch.no_grad():
        plain = model(input_ids=x).logits  # PEFT's forward before any install: the model's own
        got = {}
        for mode in ("hf", "chunked"):
            install_loss_forward(model, mode, "torch")
            assert installed_loss(model) == (mode, "torch")
            assert torch.equal(model(input_ids=x).logits, plain)  # no labels: logits, unchanged
            got[mode] = (causal_nll(model, x), causal_nll(model, x, mask))
    for (n_hf, c_hf), (n_ours, c_ours) in zip(got["hf"], got["chunked"]):
        assert torch.equal(c_hf, c_ours)
        assert torch.allclose(n_ours, n_hf, rtol=1e-6)
    assert got["chunked"][1][1].tolist() == [16, 10, 4]


def test_a_stock_model_scores_the_same_through_its_plain_head():
    """cllama eval loads a stock transformers model (lm_head an nn.Linear): the chunked path takes its weight."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    stock = LlamaForCausalLM(LlamaConfig(vocab_size=ORIG, **TINY)).eval()
    x = torch.randint(0, ORIG, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert installed_loss(stock) is None
        before = causal_nll(stock, x)  # from the logits
        install_loss_forward(stock, "chunked", "torch")
        after = causal_nll(stock, x)
        loss = stock(input_ids=x, labels=x).loss
    assert torch.allclose(after[0], before[0], rtol=1e-6) and torch.equal(after[1], before[1])
    assert torch.allclose(loss, before[0].sum() / before[1].sum(), rtol=1e-6)


def test_mean_of_a_batch_without_predicted_tokens_is_nan_as_in_transformers():
    model = tiny()
    x = ids(1, 6)
    labels = torch.full_like(x, IGNORE)
    with torch.no_grad():
        for mode in ("hf", "chunked"):
            install_loss_forward(model, mode, "torch")
            assert torch.isnan(model(input_ids=x, labels=labels).loss)


def test_the_kernel_setting_on_the_cpu():
    from cllama_dist.model.loss import resolve_kernel

    assert resolve_kernel("auto", "cpu") == ("torch", "auto: not on a GPU")
    assert resolve_kernel("torch", "cpu")[0] == "torch"
    for kind in ("liger", "cce"):
        with pytest.raises(ValueError, match="runs on CUDA only"):
            resolve_kernel(kind, "cpu")
    with pytest.raises(ValueError, match="unknown loss kernel"):
        resolve_kernel("triton", "cpu")
