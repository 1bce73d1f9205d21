"""The integration tests' training runs: one run config shape, written as users write it.

The fixtures ``setup`` (model, tokenizer, shards, a folder), ``reference`` (an uninterrupted 2-process run that
other runs are compared with) and ``same_curve`` (the runs of SAME_CURVE below) are in conftest.py, shared by
every module of this folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cllama_dist.model.presets import TINY

from . import launch

STEPS = 10


@dataclass(frozen=True)
class SameCurve:
    """A run that changes how the reference is computed, not what: it must train the reference's curve."""

    over: dict  # dotted overrides of the reference's config
    abs: float  # how far each step's loss may be from the reference's (0: bit for bit)
    why: str
    start: str = "torchrun"  # or "srun": two processes started as plain `srun` starts them (SLURM_* only)


# Each runs once per session (conftest.py's ``same_curve``), is compared with the reference by one parametrised
# test (test_train.py), and is taken from there by the tests that check more of it. Each starts in a folder where
# an earlier attempt, killed before its first checkpoint, left metrics (EARLIER_ATTEMPT): a fresh start sets
# them aside (test_reliability.py).
SAME_CURVE = {
    "no_ckpt": SameCurve({"model.gradient_checkpointing": False, "checkpoint.save_every": 0}, 1e-6,
                         "gradient checkpointing recomputes the same forward in the backward"),
    "resident": SameCurve({"engine.frozen_base": "resident", "validation.every": 0, "checkpoint.save_every": 5}, 1e-5,
                          "ZeRO-1 of the same config: the same fp32 sums up to the order of the gradient reductions"),
    "srun": SameCurve({"model.path": "", "model.config": {"vocab_size": 1000, **TINY}, "checkpoint.save_every": 0}, 0.0,
                      "no launcher (SLURM_* only), and the model built from its config with the run's seed: the same "
                      "weights as the saved base", start="srun"),
}
EARLIER_ATTEMPT = '{"type": "train", "step": 1, "loss": 9.0}\n{"type": "train", "st'


def base_config(tiny_model_dir, tiny_merged, tiny_shards, out: Path, **over) -> dict:
    """The tests' run config, nested as users write it; ``over`` takes dotted keys (``optim.max_steps``)."""
    cfg = {"output_dir": str(out),
           "model": {"path": str(tiny_model_dir), "tokenizer": str(tiny_merged)},
           "lora": {"dropout": 0.0},
           "data": {"path": str(tiny_shards), "micro_batch_size": 2, "global_batch_size": 8},
           "optim": {"max_steps": STEPS, "lr": 3e-3, "warmup_steps": 2},
           "engine": {"deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
           "checkpoint": {"save_every": 2, "keep_last": 10},
           "validation": {"every": 5, "sequences": 16},
           "logging": {"log_every": 2, "tensorboard": True}}
    for key, value in over.items():
        section, _, name = key.rpartition(".")
        (cfg.setdefault(section, {}) if section else cfg)[name] = value
    return cfg


def configure(setup, name: str, **over) -> tuple[Path, Path]:
    """Write run config NAME.yaml; ``over`` takes dotted keys: configure(setup, "x", **{"optim.max_steps": 4})."""
    model, tok, shards, root = setup
    out = root / name
    cfg = launch.write_config(root / f"{name}.yaml", **base_config(model, tok, shards, out, **over))
    return cfg, out
