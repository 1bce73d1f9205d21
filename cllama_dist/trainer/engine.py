"""The DeepSpeed engine: its JSON resolved from the run config, the optimizer's parameter groups, initialize."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


def load_deepspeed_json(cfg: TrainConfig, name: str) -> tuple[Path, dict[str, Any]]:
    """The JSON ``name`` with the run's engine.deepspeed_overrides merged into it."""
    path, ds = read_deepspeed_json(name)
    merge_into(ds, cfg.engine.deepspeed_overrides)
    return path, ds


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


# Bytes per trainable parameter beside its weight: the fp32 master (4) and Adam's two moments (8), partitioned
# over the processes in both choices, and its gradient (at most 4), partitioned under ZeRO-3 and held whole
# under resident's ZeRO-1. An upper bound, as in Trainer.save.
OPTIMIZER_STATE_BYTES = 12
GRADIENT_BYTES = 4
TRAINABLE_STATE_BYTES = OPTIMIZER_STATE_BYTES + GRADIENT_BYTES
# auto keeps the base resident when weights + optimizer share take at most this share of the free device
# memory: the rest is for activations (checkpointed layer inputs), the loss chunks and the allocator's slack.
RESIDENT_SHARE = 0.5
# The ZeRO stage a ZeRO-3 config runs as when the base is resident (make_resident says why 1 and not 2).
RESIDENT_STAGE = 1


@dataclass(frozen=True)
class FrozenBase:
    """Where the frozen base lives (engine.frozen_base resolved) and why, printed at start. ``stage``: the ZeRO
    stage the run uses (3 partitioned; resident: RESIDENT_STAGE, or the stage of the checkpoint resumed, or of a
    config that is not ZeRO-3)."""

    choice: str  # "resident" | "partitioned"
    reason: str
    stage: int = 0

    def __post_init__(self):
        if not self.stage:
            object.__setattr__(self, "stage", 3 if self.choice == "partitioned" else RESIDENT_STAGE)


def expected_bytes(choice: str, total_params: int, trainable: int, world: int, weight_bytes: int) -> int:
    """Weights + optimizer state one process holds before activations: resident keeps every weight (frozen and
    trainable, at ``weight_bytes`` each) and the trainable parameters' whole gradients; partitioned 1/world of
    both (plus, transiently, the layers being gathered, which stage3_max_live_parameters bounds). The fp32
    masters and Adam moments are partitioned in both."""
    weights, grads = total_params * weight_bytes, GRADIENT_BYTES * trainable
    if choice == "resident":
        return weights + grads + -(-OPTIMIZER_STATE_BYTES * trainable // world)
    return -(-weights // world) + -(-TRAINABLE_STATE_BYTES * trainable // world)


def choose_frozen_base(engine: EngineConfig, zero: dict[str, Any], world: int, cuda: bool,
                       sizes: Callable[[], tuple[int, int, int]] | None = None,
                       free_bytes: Callable[[], int] | None = None, resume_stage: int | None = None) -> FrozenBase:
    """The decision table of ``engine.frozen_base`` (tested in tests/unit/test_frozen_base.py).

    ``zero``: the JSON's zero_optimization block; ``sizes()``: (parameters, trainable, bytes per weight) of the
    model about to be built; ``free_bytes()``: the smallest free device memory over the ranks. Both are called
    only when auto has to decide on a GPU, and then on every rank alike (free_bytes is a collective).
    ``resume_stage``: the ZeRO stage of the checkpoint being resumed, which auto follows (a run started before
    this setting, or on another machine, resumes as it was saved instead of being refused).
    """
    setting, stage = engine.frozen_base, int(zero.get("stage", 0))
    if stage != 3:
        if setting == "partitioned":
            raise UserError(f"engine.frozen_base: partitioned needs a ZeRO-3 DeepSpeed config, and "
                            f"{engine.deepspeed_config} is ZeRO-{stage} (weights replicated); use a ZeRO-3 config "
                            "or frozen_base: auto")
        return FrozenBase("resident", f"the DeepSpeed config is ZeRO-{stage}, which never partitions weights", stage)
    # A resident checkpoint resumes under the stage it was saved with (ZeRO-2 before RESIDENT_STAGE was 1): the
    # run goes on as it began. (DeepSpeed reads either stage's files under the other as well.)
    saved_resident = resume_stage if resume_stage in (1, 2) else None
    if setting != "auto":
        return FrozenBase(setting, "as configured", (saved_resident or RESIDENT_STAGE) if setting == "resident" else 3)
    if engine.single_process_zero2:
        if world == 1:  # the legacy key's own meaning: ZeRO-2
            return FrozenBase("resident", "engine.single_process_zero2 on one process", saved_resident or 2)
        return FrozenBase("partitioned", "engine.single_process_zero2 applies to one process only")
    if resume_stage in (1, 2, 3):
        return FrozenBase("partitioned" if resume_stage == 3 else "resident",
                          f"auto: the checkpoint resumed was saved under ZeRO-{resume_stage}", resume_stage)
    if zero.get("offload_param", {}).get("device", "none") != "none":
        return FrozenBase("partitioned", "auto: the DeepSpeed config offloads parameters")
    if not cuda or sizes is None or free_bytes is None:
        # The CPU runs the tests and the tiny demo: they exercise ZeRO-3's own paths, and the processes of a
        # CPU job share one host's memory, so replicating the base there buys speed at the others' expense.
        return FrozenBase("partitioned", "auto on the CPU")
    params, trainable, weight_bytes = sizes()
    need, free = expected_bytes("resident", params, trainable, world, weight_bytes), free_bytes()
    if need <= RESIDENT_SHARE * free:
        return FrozenBase("resident", f"auto: {need / 2**30:,.1f} GiB of weights and optimizer share fit in half of "
                                      f"the {free / 2**30:,.1f} GiB free on the fullest device")
    return FrozenBase("partitioned", f"auto: {need / 2**30:,.1f} GiB of weights and optimizer share exceed half of "
                                     f"the {free / 2**30:,.1f} GiB free on the fullest device")


def make_resident(zero: dict[str, Any], stage: int = RESIDENT_STAGE) -> None:
    """A ZeRO-3 block rewritten in place as ZeRO-``stage`` (1, or 2 for runs saved that way): the frozen base
    resident, the trainable parameters' optimizer state partitioned.

    Why not DeepSpeed's ZeRO-3 means of keeping weights (deepspeed 0.19 source read for this):
    - ``stage3_param_persistence_threshold`` is a per-parameter element count (and
      ``stage3_model_persistence_threshold`` a total); persistent parameters stay gathered, but ZeRO-3 still
      loads them partitioned (zero.Init), gathers them once, and keeps its pre/post forward and backward hooks
      on every module with the prefetch coordinator tracing each sub-module, per micro-batch: the bookkeeping
      that the CPU proxy measures as the step's overhead remains.
    - ZeRO++ hierarchical partitioning (``zero_hpz_partition_size``) keeps a secondary copy within a node: the
      gathers stay on NVLink but still happen three times per micro-batch; it is for a base that does not fit.
    - ``stage3_max_live_parameters`` / ``stage3_prefetch_bucket_size`` / ``stage3_module_granularity_threshold``
      tune how gathers overlap and group; none removes them.
    - DeepCompile (``compile.deepcompile``) needs torch.compile of the whole PEFT model with checkpointing; not
      verified with this model, so not used.
    ZeRO-1 and -2 partition only what the optimizer owns. Frozen parameters are in no optimizer group, so
    DeepSpeed leaves them as plain device tensors: no gathers, no hooks, numerics of ZeRO-3
    (tests/integration/test_frozen_base.py). The cost: the whole base on every device, and loading it whole in
    each process (no zero.Init).

    Why ZeRO-1 rather than 2: ZeRO-2 also partitions the gradients, which it does by moving every trainable
    gradient into its reduce buckets in a hook after each micro-batch's backward and reduce-scattering them
    (stage_1_and_2.py's reduce_independent_p_g_buckets_and_remove_grads); ZeRO-1 lets the micro-batches
    accumulate in place and reduces once, at the accumulation boundary: accumulation-steps times fewer gradient
    reductions across the processes. The gradients kept whole are those of LoRA and the new rows (7B: ~167M
    values, ~0.3 GB in bf16), small beside the base that resident already replicates. On one process (the CPU
    proxy, docs/benchmarks.md) the two measured the same. Both stages save the same checkpoint layout.
    """
    zero["stage"] = stage
    for key in [k for k in zero if k.startswith(("stage3_", "zero_hpz", "zero_quantized")) or k == "offload_param"]:
        del zero[key]  # ZeRO-3-only settings


@dataclass(frozen=True)
class EngineChoice:
    """How the run uses DeepSpeed, decided once at start (``choose``) and printed: the JSON and why, where the
    frozen base lives, the compute dtype, and the JSON as resolved (written to RUN/ds_config.json)."""

    name: str
    reason: str
    frozen: FrozenBase
    dtype: str
    ds_config: dict[str, Any]

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)


def choose(cfg: TrainConfig, plan: Plan, dtype: str, universal: bool, nodes: int, cuda: bool,
           sizes: Callable[[], tuple[int, int, int]] | None = None, free_bytes: Callable[[], int] | None = None,
           resume_stage: int | None = None) -> EngineChoice:
    """The run's DeepSpeed JSON (chosen and read once), its frozen-base choice (``choose_frozen_base``; on a GPU
    ``free_bytes`` is a collective, so every rank calls this) and the JSON resolved from both."""
    name, reason = choose_deepspeed_json(cfg.engine, nodes, cuda)
    path, ds = load_deepspeed_json(cfg, name)
    frozen = choose_frozen_base(cfg.engine, ds.get("zero_optimization", {}), plan.world, cuda, sizes, free_bytes,
                                resume_stage)
    return EngineChoice(name, reason, frozen, dtype, fill(path, ds, cfg, plan, dtype, universal, frozen))


def resolve(cfg: TrainConfig, plan: Plan, dtype: str, universal: bool, nodes: int = 1,
            cuda: bool = False, frozen_base: FrozenBase | str = "") -> dict[str, Any]:
    """The DeepSpeed JSON of the run config, resolved (``fill``). ``frozen_base``: the resolved choice
    (``choose_frozen_base``; a bare "resident" means RESIDENT_STAGE); empty: decided here without device memory
    (the CPU's rule). The trainer goes through ``choose``, which reads the JSON once for both decisions."""
    name, _ = choose_deepspeed_json(cfg.engine, nodes, cuda)
    path, ds = load_deepspeed_json(cfg, name)
    if isinstance(frozen_base, str):
        frozen_base = FrozenBase(frozen_base, "") if frozen_base else \
            choose_frozen_base(cfg.engine, ds.get("zero_optimization", {}), plan.world, cuda=False)
    return fill(path, ds, cfg, plan, dtype, universal, frozen_base)


def fill(path: Path, ds: dict[str, Any], cfg: TrainConfig, plan: Plan, dtype: str, universal: bool,
         frozen_base: FrozenBase) -> dict[str, Any]:
    """The DeepSpeed JSON ``ds`` (read from ``path``) with its "auto" values filled from the run config, in one
    place, and rewritten for a resident frozen base."""
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
    if zero.get("stage") == 3 and frozen_base.choice == "resident":
        make_resident(zero, frozen_base.stage)
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
