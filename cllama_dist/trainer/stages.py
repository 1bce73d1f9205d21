"""Staged schedules: a run in stages, each with its own trainable set, steps, learning rates and warm-up.

The paper's basic 7B trained in two stages: the new embedding rows alone with the transformer frozen, then
LoRA + the embedding rows. ``stages:`` in a run config names them (configs/llama-7b-two-stage.yaml)::

    stages:
      - {name: embeddings, trainable: embeddings, steps: 2000, embedding_lr: 2.0e-4}
      - {name: lora, trainable: lora+embeddings, steps: 6000, lr: 1.0e-4}

The design: ONE DeepSpeed engine over the union of what any stage trains (LoRA + the embedding rows), so
that a stage boundary is an ordinary step, a checkpoint anywhere (inside a stage, at the boundary) resumes
through the trainer's one resume path, also on another number of processes (universal checkpoints), and
export sees one set of trained tensors. Rebuilding the engine per stage would need a second, partial load
path under ZeRO-3 for every boundary. What keeps a frozen group frozen inside that one engine:

- its gradients are replaced by exact zeros before they reach DeepSpeed (a hook on each parameter,
  ``Gates``): the gradient norm and clipping see only what trains in the stage, and AdamW's moments of the
  frozen group stay zero;
- its learning rate is 0: torch's AdamW decays decoupled weights by ``p *= 1 - lr * wd`` and steps by
  ``lr * m / (sqrt(v) + eps)``, both exactly nothing at lr 0, so the weights stay bit-identical (tested);
- LoRA is present from the start but zero-effect while frozen: PEFT initialises B to zero, so B(A x) adds
  exactly 0.0 to each projection; an embeddings-only stage computes what a model without LoRA computes.

At the first step of every later stage the optimizer's state (both moments and the step count of every
group) starts fresh, as a separate run from the previous stage's last weights would, so the learning rate
re-warms over fresh moments and AdamW's bias correction restarts. The reset happens at that step whether
the run got there uninterrupted or resumed from a checkpoint saved at the boundary, so both continue alike.

The data continue through the same order across stages (the global sample position): a stage does not
restart the epoch, and a resume anywhere reads the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import TRAINABLE, OptimConfig, StageConfig
from .plan import schedule_factor

if TYPE_CHECKING:  # torch is imported where the gates are built: the schedule itself is plain arithmetic
    import torch


@dataclass(frozen=True)
class TrainingStage:
    """A stage resolved against the run's optim section: steps start..start+steps-1 (0-based)."""

    index: int
    name: str
    trainable: tuple[str, ...]
    start: int
    steps: int
    peak: tuple[tuple[str, float], ...]  # (group, peak lr); 0 for a group frozen in this stage
    warmup: int
    min_lr_ratio: float

    @property
    def end(self) -> int:
        return self.start + self.steps

    def factor(self, step: int) -> float:
        """Linear warm-up from this stage's first step, then cosine decay reaching min_lr_ratio at its end."""
        return schedule_factor(step - self.start, self.warmup, self.steps, self.min_lr_ratio)

    def as_dict(self) -> dict:
        return {"name": self.name, "trainable": "+".join(self.trainable), "start": self.start, "steps": self.steps,
                "peak": dict(self.peak), "warmup": self.warmup, "min_lr_ratio": self.min_lr_ratio}


class Schedule:
    """The stages of a run, the learning rate of each group at each step, and the gates of frozen groups.

    A run without ``stages:`` is one stage over its ``max_steps`` under optim's schedule (plan.lr_factor's
    curve, the same numbers), named "" and training LoRA + the embeddings: the loop steps every run the same
    way. What a plain run writes stays as it was: no stage lines at start, ``stages: []`` in the checkpoint's
    schedule record (so a staged checkpoint resumed without stages, or the reverse, is a schedule change), and
    train records holding ``lr`` alone."""

    def __init__(self, stages: list[StageConfig], optim: OptimConfig, max_steps: int = 0):
        self.staged = bool(stages)
        if not stages:  # the plain run: max_steps is the plan's (optim.max_steps, or one pass over the data)
            stages = [StageConfig(name="plain", trainable="lora+embeddings", steps=max(max_steps, 1))]
        self.stages: list[TrainingStage] = []
        start = 0
        for i, s in enumerate(stages):
            lr = s.lr or optim.lr
            peaks = {"lora": lr, "embeddings": s.embedding_lr or optim.embedding_lr or lr}
            kinds = TRAINABLE[s.trainable]
            warmup = s.warmup_steps if s.warmup_steps >= 0 else (optim.warmup_steps or
                                                                 int(optim.warmup_ratio * s.steps))
            self.stages.append(TrainingStage(i, s.name if self.staged else "", kinds, start, s.steps,
                                             tuple((g, peaks[g] if g in kinds else 0.0) for g in ("lora", "embeddings")),
                                             warmup, s.min_lr_ratio if s.min_lr_ratio >= 0 else optim.min_lr_ratio))
            start += s.steps
        self.max_steps = start
        self.optim = optim
        self.gates: Gates | None = None

    @property
    def freezes(self) -> bool:
        """Some stage freezes a group: its gradients must be gated (``Gates``) before DeepSpeed sees them."""
        return any(g not in s.trainable for s in self.stages for g, _ in s.peak)

    def at(self, step: int) -> TrainingStage:
        """The stage that step ``step`` (0-based) belongs to; the last one for the step after the end."""
        return next((s for s in self.stages if step < s.end), self.stages[-1])

    def describe(self) -> list[str]:
        if not self.staged:
            return []
        return [f"stage {s.index + 1}/{len(self.stages)} {s.name!r}: steps {s.start + 1}..{s.end}, trains "
                f"{' + '.join(s.trainable)}, peak lr " + ", ".join(f"{g} {v:g}" for g, v in s.peak if v)
                + f", warm-up {s.warmup}, decay to {s.min_lr_ratio:g}" for s in self.stages]

    def record(self) -> dict:
        """What shapes the learning-rate curve, as the checkpoint records it (checked on resume: a change is
        refused unless checkpoint.allow_schedule_change). ``stages`` is [] for a plain run."""
        o = self.optim
        return {"max_steps": self.max_steps, "lr": o.lr, "embedding_lr": o.embedding_lr or o.lr,
                "warmup_steps": o.warmup_steps or int(o.warmup_ratio * self.max_steps),
                "min_lr_ratio": o.min_lr_ratio, "stages": [s.as_dict() for s in self.stages] if self.staged else []}

    def enter(self, engine, step: int) -> dict:
        """Before step ``step``: close the gates of the groups this stage freezes, give each group its learning
        rate, and at a later stage's first step start the optimizer's state afresh. Returns the lr record."""
        stage = self.at(step)
        if self.gates is not None:
            self.gates.closed = {g for g, _ in stage.peak if g not in stage.trainable}
        if step == stage.start and stage.index > 0:
            reset_optimizer_state(engine)
        factor, peak = stage.factor(step), dict(stage.peak)
        for g in engine.optimizer.param_groups:
            g["lr"] = peak[g["name"]] * factor
        if not self.staged:
            return {"lr": peak["lora"] * factor}
        return {"lr": peak["lora"] * factor, "embedding_lr": peak["embeddings"] * factor, "stage": stage.name}


class Gates:
    """Exact-zero gradients for the parameter groups a stage freezes, applied by a hook on each parameter
    before DeepSpeed sees the gradient (its own hooks act after accumulation into the parameter), so ZeRO's
    reduction, the gradient norm and AdamW's moments get zeros. Nothing else changes: requires_grad stays as
    deepspeed.initialize saw it (ZeRO builds its partitions and hooks from it once)."""

    def __init__(self, model: torch.nn.Module):
        import torch

        from ..model.vocab import is_embedding_param

        self.closed: set[str] = set()
        self.handles = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                group = "embeddings" if is_embedding_param(name) else "lora"  # engine.param_groups' rule
                self.handles.append(p.register_hook(lambda grad, g=group: torch.zeros_like(grad)
                                                    if g in self.closed else grad))


def reset_optimizer_state(engine) -> None:
    """Every tensor of the optimizer's state (AdamW: exp_avg, exp_avg_sq, step) set to zero, in place, where
    DeepSpeed keeps it: the torch optimizer inside ZeRO's wrapper holds its flat fp32 partitions' state."""
    import torch

    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif isinstance(value, (int, float)):
                state[key] = type(value)(0)
