"""Staged schedules (trainer/stages.py), single-process: the schedule, the gates and AdamW at lr 0, the config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cllama_dist.config import build
from cllama_dist.errors import UserError
from cllama_dist.trainer import engine as engines
from cllama_dist.trainer.config import TrainConfig
from cllama_dist.trainer.stages import Gates, Schedule


def config(stages, **optim) -> TrainConfig:
    return build(TrainConfig, {"model": {"config": {"vocab_size": 10}}, "optim": {"max_steps": 0, **optim},
                               "stages": stages})


TWO = [{"name": "emb", "trainable": "embeddings", "steps": 4, "embedding_lr": 1e-2, "warmup_steps": 2},
       {"name": "both", "trainable": "lora+embeddings", "steps": 6, "lr": 3e-3}]


def test_stages_resolve_against_optim_and_rewarm_at_each_start():
    cfg = config(TWO, lr=1e-3, warmup_ratio=0.5, min_lr_ratio=0.2)
    sched = Schedule(cfg.stages, cfg.optim)
    first, second = sched.stages
    assert sched.max_steps == 10 and (first.start, first.end, second.start, second.end) == (0, 4, 4, 10)
    assert dict(first.peak) == {"lora": 0.0, "embeddings": 1e-2}  # LoRA frozen in stage 1
    # Stage 2: its own lr; the rows take it too (no embedding_lr anywhere); warm-up = optim's ratio of its steps.
    assert dict(second.peak) == {"lora": 3e-3, "embeddings": 3e-3} and second.warmup == 3
    assert [sched.at(s).name for s in range(11)] == ["emb"] * 4 + ["both"] * 7
    # The cosine reaches its floor at the stage's end, as the one-stage curve does at max_steps (plan.lr_factor).
    assert [first.factor(s) for s in (0, 1)] == [0.5, 1.0] and first.factor(3) == pytest.approx(0.2 + 0.8 * 0.5)
    # Re-warmed: the first step of stage 2 is at 1/3 of its peak, after stage 1 decayed to its floor.
    assert [second.factor(s) for s in (4, 5, 6)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert second.factor(9) == pytest.approx(0.2 + 0.8 * 0.25) and second.factor(10) == pytest.approx(0.2)


class Toy(nn.Module):
    """Parameter names as the trainer's model has them: LoRA and the new rows (model/vocab.py's names)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Module()
        self.embed.weight_new = nn.Parameter(torch.randn(3, 4, generator=g))
        self.proj = nn.Module()
        self.proj.lora_A = nn.Parameter(torch.randn(2, 4, generator=g))
        self.proj.lora_B = nn.Parameter(torch.zeros(4, 2))  # PEFT's B = 0: zero-effect

    def forward(self, x):
        h = x @ self.embed.weight_new.T  # (n, 3)
        return (h.sum(-1, keepdim=True) * x + x @ self.proj.lora_A.T @ self.proj.lora_B.T).pow(2).mean()


class FakeEngine:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_an_embeddings_stage_leaves_lora_bit_identical_and_the_next_starts_with_fresh_state():
    cfg = config(TWO, weight_decay=0.1)  # weight decay on LoRA: at lr 0 it must not move it either
    sched = Schedule(cfg.stages, cfg.optim)
    model = Toy()
    sched.gates = Gates(model)
    opt = torch.optim.AdamW(engines.param_groups(model, cfg.optim), lr=1.0)
    engine = FakeEngine(opt)
    a0, b0, e0 = (p.detach().clone() for p in (model.proj.lora_A, model.proj.lora_B, model.embed.weight_new))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        sched.enter(engine, step)
        opt.zero_grad()
        model(x).backward()
        assert not model.proj.lora_B.grad.any()  # gated: exact zeros reach the optimizer
        opt.step()
    assert torch.equal(model.proj.lora_A, a0) and torch.equal(model.proj.lora_B, b0)
    assert not torch.equal(model.embed.weight_new, e0)
    lora_state = opt.state[model.proj.lora_B]
    assert not lora_state["exp_avg"].any() and not lora_state["exp_avg_sq"].any()
    # Stage 2's first step: LoRA's gradients flow, and every group's state restarts (AdamW's step count 1).
    record = sched.enter(engine, 4)
    assert record["stage"] == "both" and record["lr"] > 0
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    opt.zero_grad()
    model(x).backward()
    assert model.proj.lora_B.grad.any()
    opt.step()
    assert all(float(s["step"]) == 1 for s in opt.state.values())
    assert not torch.equal(model.proj.lora_B, b0)


def test_a_lora_stage_leaves_the_rows_bit_identical():
    cfg = config([{"name": "only-lora", "trainable": "lora", "steps": 3}])
    sched = Schedule(cfg.stages, cfg.optim)
    model = Toy()
    sched.gates = Gates(model)
    opt = torch.optim.AdamW(engines.param_groups(model, cfg.optim), lr=1.0)
    e0 = model.embed.weight_new.detach().clone()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        sched.enter(FakeEngine(opt), step)
        opt.zero_grad()
        model(x).backward()
        opt.step()
    assert torch.equal(model.embed.weight_new, e0) and model.proj.lora_B.any()


@pytest.mark.parametrize("stages, optim, message", [
    (TWO, {"max_steps": 12}, r"^stages: the stages' steps add up to 10 \(4 \+ 6\), but optim.max_steps is 12"),
    ([{**TWO[0], "trainable": "embedding"}], {}, r"^stages\[0\]\.trainable: 'embedding' is not one of 'embeddings', "
                                                 r"'lora\+embeddings', 'lora'; did you mean 'embeddings'\?"),
    ([TWO[0], {**TWO[1], "name": "emb"}], {}, "^stages: stage names must be unique; repeated: emb$"),
    ([{**TWO[0], "name": ""}], {}, r"^stages\[0\]\.name: is required"),
    ([{**TWO[0], "steps": 0}], {}, r"^stages\[0\]\.steps: stage 'emb': must be at least 1, got 0$"),
])
def test_bad_stages_are_refused_in_one_line(stages, optim, message):
    with pytest.raises(UserError, match=message) as info:
        config(stages, **optim)
    assert "\n" not in str(info.value)


def test_a_run_without_stages_is_unchanged():
    cfg = build(TrainConfig, {"model": {"config": {"vocab_size": 10}}, "optim": {"max_steps": 7}})
    assert cfg.stages == [] and cfg.optim.max_steps == 7


def test_stages_as_flags():
    cfg = config(["emb=embeddings:4", "{name: both, trainable: lora+embeddings, steps: 6, lr: 3.0e-3}"])
    assert [(s.name, s.trainable, s.steps, s.lr) for s in cfg.stages] == [("emb", "embeddings", 4, 0.0),
                                                                         ("both", "lora+embeddings", 6, 3e-3)]
    with pytest.raises(UserError, match=r"^stages\[0\]: expected NAME=TRAINABLE:STEPS"):
        config(["emb-embeddings"])
    with pytest.raises(UserError, match=r"^stages\[0\]: trainable: 'embedding' is not one of"):
        config(["emb=embedding:4"])
