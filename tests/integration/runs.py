"""The integration tests' training runs: one run config shape, written as users write it.

The fixtures ``setup`` (model, tokenizer, shards, a folder) and ``reference`` (an uninterrupted 2-process
run that other runs are compared with) are in conftest.py, shared by every module of this folder.
"""

from __future__ import annotations

from pathlib import Path

from . import launch

STEPS = 10


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
