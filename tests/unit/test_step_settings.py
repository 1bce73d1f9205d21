"""The rest of the step (issue 14, item 4): selective activation checkpointing, LoRA without a dropout copy,
the attention kernel's auto choice, micro-batches copied one ahead."""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from torch import nn

from cllama_dist.model import flops
from cllama_dist.model.adapters import build_model
from cllama_dist.model.config import LoraConfig, ModelConfig, resolve_attn
from cllama_dist.model.presets import TINY
from cllama_dist.trainer.batches import DeviceCopier, model_inputs

ORIG, NEW = 100, 120


def tiny(layers: int = 4, dropout: float = 0.0, **model) -> nn.Module:
    cfg = ModelConfig(config={**TINY, "num_hidden_layers": layers, "vocab_size": ORIG}, **model)
    m, _ = build_model(cfg, LoraConfig(rank=4, dropout=dropout), seed=0, orig_vocab=ORIG, new_vocab=NEW,
                       dtype=torch.float32)
    return m


def loss_and_grads(model: nn.Module, ids: torch.Tensor):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def test_every_other_checkpoints_layers_0_2_4_and_matches_all_and_off():
    ids = torch.randint(0, NEW, (2, 32), generator=torch.Generator().manual_seed(3))
    runs = {}
    for name, kw in {"off": dict(gradient_checkpointing=False), "all": dict(checkpoint_scope="all"),
                     "every-other": dict(checkpoint_scope="every-other")}.items():
        model = tiny(layers=5, **kw)
        layers = decoder_layers(model)
        # What is recomputed, observed: a checkpointed layer's MLP starts again in the backward pass (a pre-hook:
        # torch stops a recomputation early, once the last tensor it needs is saved, inside the MLP).
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        runs[name] = loss_and_grads(model, ids)
        runs[name] += (calls,)
    assert runs["off"][2] == [1, 1, 1, 1, 1]
    assert runs["all"][2] == [2, 2, 2, 2, 2]
    assert runs["every-other"][2] == [2, 1, 2, 1, 2]  # layers 0, 2, 4 of 5: flops.checkpointed_layers
    assert flops.checkpointed_layers(5, "every-other") == [0, 2, 4]
    loss0, grads0, _ = runs["off"]
    for name in ("all", "every-other"):
        loss, grads, _ = runs[name]
        assert torch.allclose(loss, loss0, rtol=0, atol=1e-6), name
        assert grads.keys() == grads0.keys() and any("lora_A" in n for n in grads)
        for n in grads0:
            assert torch.allclose(grads[n], grads0[n], rtol=1e-5, atol=1e-7), (name, n)


def test_checkpointing_flops_scale_with_the_share_recomputed():
    arch = flops.Arch(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=49_953)
    args = (arch, 2048, 19_000_000, 17_953)
    off, every, full = (flops.flops_per_token(*args, c)["actual"] for c in
                        (0.0, flops.checkpoint_share(22, True, "every-other"), flops.checkpoint_share(22, True)))
    assert flops.checkpoint_share(22, True, "every-other") == 0.5 and flops.checkpoint_share(22, False) == 0.0
    assert flops.flops_per_token(*args, True)["actual"] == full and flops.flops_per_token(*args, False)["actual"] == off
    # Recomputation = the decoder layers' forward (2 x (N_layers + N_lora)) plus attention once, times the share.
    recompute = 2 * (arch.layer_params + 19_000_000) + 4 * 22 * 2048 * 2048
    assert full - off == recompute and every - off == recompute / 2
    assert flops.checkpoint_share(5, True, "every-other") == 3 / 5


def test_lora_without_dropout_holds_no_dropout_module_and_copies_nothing():
    """PEFT 0.21 already replaces the dropout by nn.Identity at lora_dropout 0: this pins that down."""
    x = torch.randn(3, 64)
    for dropout, kind in ((0.0, nn.Identity), (0.05, nn.Dropout)):
        model = tiny(layers=1, dropout=dropout)
        drops = [m for name, d in model.named_modules() if name.endswith("lora_dropout") for m in d.values()]
        assert len(drops) == 7 and all(type(m) is kind for m in drops), dropout  # the seven projections
    model = tiny(layers=1, dropout=0.0)
    drops = [m for name, d in model.named_modules() if name.endswith("lora_dropout") for m in d.values()]
    model.train()
    assert all(m(x) is x for m in drops)  # the input itself: no copy of the activations


def test_attention_auto_is_sdpa_on_the_cpu_and_flash_attn_on_a_gpu_where_installed(monkeypatch):
    assert resolve_attn("auto", cuda=False, dtype="bf16") == "sdpa"
    assert resolve_attn("eager", cuda=True, dtype="bf16") == "eager"
    assert resolve_attn("auto", cuda=True, dtype="fp32") == "sdpa"  # flash-attn has no fp32 kernel
    real = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if installed else None) if name == "flash_attn" else real(name, *a))
        assert resolve_attn("auto", cuda=True, dtype="bf16") == ("flash_attention_2" if installed else "sdpa")
        # several packed rows per micro-batch: flash-attn would see no boundaries (model/packing.py refuses it)
        assert resolve_attn("auto", cuda=True, dtype="bf16", packed_rows=True) == "sdpa"
        assert resolve_attn("flash_attention_2", cuda=True, dtype="bf16", packed_rows=True) == "flash_attention_2"
    monkeypatch.undo()
    assert ModelConfig(config={"vocab_size": 10}).attn_implementation == "auto"
    assert tiny(layers=1).config._attn_implementation == "sdpa"  # the CPU keeps today's kernel


def test_device_copier_keeps_order_and_values_and_converts_one_ahead():
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, NEW, (2, 16)),
                "segments": np.repeat(np.arange(4), 4)[None].repeat(2, 0),
                "position_ids": np.tile(np.arange(4), 4)[None].repeat(2, 0),
                "labels": rng.integers(-100, NEW, (2, 16))} for _ in range(4)]
    log: list[tuple[str, int]] = []

    def convert(rows):
        log.append(("convert", next(i for i, b in enumerate(batches) if b is rows)))
        return model_inputs(rows, "cpu", "sdpa", torch.float32)

    for ahead in (0, 1):
        log.clear()
        copier = DeviceCopier(convert, "cpu", ahead=ahead)
        got = []
        for k, rows in enumerate(copier.stream(iter(batches))):
            log.append(("use", k))
            got.append((rows, copier.take(rows)))
        assert [r for r, _ in got] == batches  # order preserved, the very row objects
        for rows, tensors in got:
            want = model_inputs(rows, "cpu", "sdpa", torch.float32)
            assert tensors.keys() == want.keys() and all(torch.equal(tensors[k], want[k]) for k in want)
            assert torch.equal(tensors["labels"], torch.from_numpy(rows["labels"]))  # prefetched with the inputs
        assert [e for e in log if e[0] == "convert"] == [("convert", i) for i in range(4)]  # each once
        if ahead:  # batch k+1 is converted before batch k is used
            assert log == [("convert", 0), ("convert", 1), ("use", 0), ("convert", 2), ("use", 1),
                           ("convert", 3), ("use", 2), ("use", 3)]
        else:
            assert log == [e for k in range(4) for e in (("use", k), ("convert", k))]
    assert DeviceCopier(convert, "cpu").ahead == 0  # a no-op on the CPU
    # Rows that were never streamed are converted on the spot.
    other = {"input_ids": np.zeros((1, 4), dtype=np.int64)}
    assert torch.equal(DeviceCopier(lambda r: model_inputs(r, "cpu", "sdpa", torch.float32), "cpu", ahead=1)
                       .take(other)["input_ids"], torch.zeros(1, 4, dtype=torch.int64))
