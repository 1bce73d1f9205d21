"""The DeepSpeed engine: its JSON resolved from the run config, the optimizer's parameter groups, initialize."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import PROJECT_ROOT, distributed as dist
from ..errors import UserError
from ..model.vocab import is_embedding_param
from .config import EngineConfig, OptimConfig, TrainConfig
from .plan import Plan


def choose_deepspeed_json(engine: EngineConfig, nodes: int, cuda: bool) -> tuple[str, str]:
    """The DeepSpeed JSON this run uses, and why (printed at start)."""
    if engine.deepspeed_config != "auto":
        return engine.deepspeed_config, "as configured"
    if cuda and nodes > 1:
        return "deepspeed_configs/zero3_multinode.json", (f"auto: {nodes} GPU nodes, hierarchical partitioning within "
                                                          "each node, no quantization")
    return "deepspeed_configs/zero3.json", "auto"


def read_deepspeed_json(name: str) -> tuple[Path, dict[str, Any]]:
    path = Path(name)
    if not path.is_file() and not path.is_absolute() and (PROJECT_ROOT / path).is_file():
        path = PROJECT_ROOT / path  # a path relative to the checkout, as the shipped configs write it
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config {name} not found") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read DeepSpeed config {path}: {exc.strerror}") from None
    if not isinstance(ds, dict):
        raise UserError(f"DeepSpeed config {path} must hold a JSON object")
    return path, ds


def resolve(cfg: TrainConfig, plan: Plan, dtype: str, universal: bool, nodes: int = 1,
            cuda: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON with its "auto" values filled from the run config, in one place."""
    name, _ = choose_deepspeed_json(cfg.engine, nodes, cuda)
    path, ds = read_deepspeed_json(name)
    merge_into(ds, cfg.engine.deepspeed_overrides)
    filled = {
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": cfg.optim.clip_grad,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise UserError(f"{path}: {key} is {ds[key]}, but the run config gives {value}; set it to \"auto\"")
        ds[key] = value
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") == 3 and plan.world == 1 and cfg.engine.single_process_zero2:
        zero["stage"] = 2
        for key in [k for k in zero if k.startswith(("stage3_", "zero_hpz", "zero_quantized"))]:
            del zero[key]  # ZeRO-3-only settings
    if zero.get("zero_hpz_partition_size") == "auto":
        # ZeRO++ hierarchical partitioning: a secondary copy of the weights within each node, so the
        # per-micro-step all-gather stays on NVLink. "auto" = the processes of one node.
        zero["zero_hpz_partition_size"] = dist.local_world_size()
    ds["bf16"] = {"enabled": dtype == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": dtype == "fp16"}
    ds.setdefault("steps_per_print", 10**9)  # our own logging replaces DeepSpeed's
    ds.setdefault("wall_clock_breakdown", False)
    if universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def merge_into(base: dict, extra: dict) -> None:
    """Nested mappings merge key by key; anything else replaces."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_into(base[key], value)
        else:
            base[key] = value


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """Two AdamW groups: LoRA (lr, weight decay) and the embedding rows (embedding_lr, never weight decay)."""
    lora, emb = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (emb if is_embedding_param(name) else lora).append(p)
    groups = [{"params": lora, "weight_decay": optim.weight_decay, "peak_lr": optim.lr, "name": "lora"},
              # No weight decay on embedding rows: it would pull the new rows toward zero (and, were the
              # old rows masked instead of split off, move them too).
              {"params": emb, "weight_decay": 0.0, "peak_lr": optim.embedding_lr or optim.lr, "name": "embeddings"}]
    return [g for g in groups if g["params"]]


def initialize(model: torch.nn.Module, optim: OptimConfig, ds_config: dict[str, Any]):
    """deepspeed.initialize with torch's AdamW (DeepSpeed's own JIT-builds a C++ op on the CPU)."""
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=tuple(optim.adam_betas),
                                  eps=optim.adam_eps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine


def set_lr(engine, factor: float) -> None:
    for g in engine.optimizer.param_groups:
        g["lr"] = g["peak_lr"] * factor


def discard_gradients(engine) -> None:
    """Drop the gradients of a skipped step (earlier micro-batches' are already reduced into ZeRO's partitions)."""
    opt = engine.optimizer
    opt.zero_grad(set_to_none=True)
    if hasattr(opt, "averaged_gradients"):
        opt.averaged_gradients = {}
