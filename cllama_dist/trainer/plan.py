"""The run's batch arithmetic and learning-rate schedule, computed once and printed at start."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..data.config import DataConfig
from ..errors import UserError
from .config import OptimConfig


@dataclass(frozen=True)
class Plan:
    world: int
    micro: int
    accum: int
    block: int
    max_steps: int
    train_sequences: int
    # A mixture (data.sets): per set (name, train sequences, sequences the planned steps draw from it).
    sets: tuple[tuple[str, int, int], ...] = ()

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.block

    @classmethod
    def make(cls, data: DataConfig, max_steps: int, world: int, block: int, train_sequences: int,
             mixture=None) -> "Plan":
        """``mixture``: a data/loader.MixedOrder, whose draws over the planned steps give each set's share."""
        if data.global_batch_size:
            if data.global_batch_size % (data.micro_batch_size * world):
                raise UserError(f"data.global_batch_size {data.global_batch_size} is not a multiple of "
                                f"data.micro_batch_size {data.micro_batch_size} x {world} processes")
            accum = data.global_batch_size // (data.micro_batch_size * world)
        else:
            accum = data.grad_accum
        g = data.micro_batch_size * accum * world
        steps = max_steps or max(1, train_sequences // g)
        sets = ()
        if mixture is not None:
            drawn = mixture.consumed(steps * g)
            sets = tuple((name, size, drawn[name]) for name, size in zip(mixture.names, mixture.sizes))
        return cls(world, data.micro_batch_size, accum, block, steps, train_sequences, sets)

    def describe(self) -> str:
        epochs = self.max_steps * self.global_batch / max(self.train_sequences, 1)
        return (f"{self.world} processes x micro-batch {self.micro} x accumulation {self.accum} = {self.global_batch} "
                f"sequences x {self.block} tokens = {self.tokens_per_step:,} tokens per step; {self.max_steps:,} steps "
                f"= {self.max_steps * self.tokens_per_step:,} tokens ({epochs:.2f} epochs of {self.train_sequences:,} sequences)"
                + self.describe_sets())

    def describe_sets(self) -> str:
        """Each set's share of the planned tokens (every sequence has ``block`` tokens, so the share of sequences
        drawn), and the epochs of it that this is."""
        if not self.sets:
            return ""
        total = max(1, sum(d for _, _, d in self.sets))
        parts = [f"{name} {100 * d / total:.1f}% ({d * self.block:,} tokens, {d / max(n, 1):.2f} epochs of {n:,} "
                 "sequences)" for name, n, d in self.sets]
        return "; mixture: " + ", ".join(parts)


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps."""
    warmup = optim.warmup_steps or int(optim.warmup_ratio * max_steps)
    return schedule_factor(step, warmup, max_steps, optim.min_lr_ratio)


def schedule_factor(step: int, warmup: int, steps: int, min_lr_ratio: float) -> float:
    """The share of the peak learning rate at step ``step`` (0-based) of ``steps``: linear warm-up over ``warmup``
    steps, then cosine decay reaching ``min_lr_ratio`` at step ``steps`` (a run's whole curve, or one stage's)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
