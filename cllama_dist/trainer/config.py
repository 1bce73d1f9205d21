"""The training run's settings, as sections: model, lora, data (elsewhere, beside their code) and optim,
engine, checkpoint, validation, logging and the stages of a staged schedule (here, beside the trainer's
components; stages.py resolves the stages against optim).

    cllama train --config run.yaml --optim.lr 1e-4 --data.path shards/     # dotted flags

A YAML file nests (``optim: {lr: 1e-4}``) or uses dotted keys (``optim.lr: 1e-4``); the flat keys and flags of
earlier versions (``lr:``, ``--lr``) are refused, naming the key that replaced them (config.RENAMED).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import PathStr, Section, check, option
from ..data.config import DataConfig
from ..model.config import LoraConfig, ModelConfig


@dataclass
class OptimConfig(Section):
    """AdamW over two groups (LoRA, embedding rows), warm-up + cosine schedule, clipping, non-finite steps."""

    max_steps: int = option(0, "Optimizer steps to train (0: one pass over the train split).")
    lr: float = option(2e-4, "Peak learning rate of LoRA weights (the paper: 2e-4).")
    embedding_lr: float = option(0.0, "Peak learning rate of the embedding rows (0: same as lr).")
    weight_decay: float = option(0.0, "AdamW weight decay on LoRA weights; never applied to embedding rows.")
    adam_betas: list[float] = option([0.9, 0.95], "AdamW betas.")
    adam_eps: float = option(1e-8, "AdamW epsilon.")
    warmup_steps: int = option(0, "Linear warm-up steps.")
    warmup_ratio: float = option(0.05, "Warm-up as a share of max_steps (used when warmup_steps is 0).")
    min_lr_ratio: float = option(0.1, "Cosine decay ends at this share of the peak learning rate.")
    clip_grad: float = option(1.0, "Gradient norm clipping (0: off).")
    max_nonfinite_steps: int = option(
        3, "Stop after this many steps in a row with a non-finite loss (each is skipped), saving the last good state.")

    def validate(self) -> None:
        for name in ("max_steps", "warmup_steps", "max_nonfinite_steps"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(self.embedding_lr >= 0, "embedding_lr", f"must be >= 0, got {self.embedding_lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
              f"needs two values in [0, 1), got {self.adam_betas}")
        check(self.adam_eps > 0, "adam_eps", f"must be positive, got {self.adam_eps}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(self.clip_grad >= 0, "clip_grad", f"must be >= 0, got {self.clip_grad}")


@dataclass
class EngineConfig(Section):
    """DeepSpeed: the JSON, overrides, precision."""

    deepspeed_config: PathStr = option(
        "auto", "DeepSpeed JSON (deepspeed_configs/zero3.json, zero3_offload.json, zero2.json, "
        "zero3_multinode.json); its \"auto\" values are filled from this config. auto: zero3.json, or on GPUs "
        "across several nodes zero3_multinode.json (ZeRO++ hierarchical partitioning: a second copy of the weights "
        "within each node, so the per-micro-step all-gather stays on the node; numerics unchanged).",
        aliases=["--ds-config"])
    deepspeed_overrides: dict = option(
        {}, "Settings merged into the DeepSpeed JSON (nested mappings merge key by key). The tiny CPU configs set "
            "zero_optimization.stage3_param_persistence_threshold: 0 so that tiny weights are partitioned too.")
    frozen_base: Literal["auto", "resident", "partitioned"] = option(
        "auto", "Where the frozen bf16 base lives under a ZeRO-3 config. partitioned: ZeRO-3 as configured, each "
                "process holds 1/world of every weight and all-gathers each layer in the forward, the recomputation "
                "and the backward of every micro-batch. resident: the whole frozen base on every device and no "
                "weight gathers, while the optimizer state of the trainable parameters (LoRA, new rows) stays "
                "partitioned; done by running the config as ZeRO-1, which partitions only what the optimizer owns "
                "and reduces the trainable gradients once per step (trainer/engine.py says why not ZeRO-3 "
                "persistence, nor ZeRO-2). auto: resident on GPUs when the weights "
                "plus this process's optimizer share take at most half the device's free memory (the other half "
                "for activations and the loss), else partitioned; partitioned on the CPU (tests exercise ZeRO-3 "
                "there; host memory is shared by the processes) and with offload_param. Printed at start with the "
                "memory it expects. A resident checkpoint (ZeRO-1, or ZeRO-2 when saved by earlier versions) does "
                "not resume under ZeRO-3 nor the reverse: resuming, auto follows the checkpoint; a forced choice "
                "that differs is refused naming both.")
    single_process_zero2: bool = option(
        False, "Earlier name of frozen_base: resident for a single process (kept for existing configs; true with "
               "one process means resident, with several it changes nothing, as before). Prefer engine.frozen_base.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option(
        "auto", "Compute dtype: auto = bf16 on GPU, fp32 on CPU. LoRA weights and new rows keep fp32 masters.")
    timeout_minutes: float = option(
        10.0, "How long a collective waits for a peer before the job fails (torch's default is 30). Errors one rank "
              "sees during set-up and checkpointing reach the others at once; this bounds the rest (a hung peer).")

    def validate(self) -> None:
        check(not (self.single_process_zero2 and self.frozen_base == "partitioned"), "single_process_zero2",
              "contradicts engine.frozen_base: partitioned (single_process_zero2 is the earlier name of resident "
              "on one process); set only frozen_base")
        check(self.timeout_minutes > 0, "timeout_minutes", f"must be positive, got {self.timeout_minutes}")


@dataclass
class CheckpointConfig(Section):
    """When to save, how many to keep, where to resume from."""

    save_every: int = option(0, "Save a checkpoint every N steps (0: only at the end and on a signal).")
    keep_last: int = option(2, "Complete checkpoints to keep (older ones are deleted).")
    resume: str = option(
        "auto", "'auto' (the newest valid checkpoint in the run folder, if any: checkpoints with missing or damaged "
                "files are skipped, saying why), a checkpoint folder, or '' to start fresh (refused if the run folder "
                "already has checkpoints).")
    allow_schedule_change: bool = option(
        False, "Allow a resume whose schedule differs from the checkpoint's (optim.max_steps, learning rates, warm-up, "
               "decay floor): the change is recorded in metrics.jsonl and the run folder. Off: refused, naming the "
               "setting, because the learning-rate curve would silently change shape.")

    def validate(self) -> None:
        check(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}")
        check(self.keep_last >= 1, "keep_last", f"must be at least 1, got {self.keep_last}")


@dataclass
class ValidationConfig(Section):
    """Loss and perplexity on the validation split."""

    every: int = option(0, "Evaluate on the validation split every N steps (0: only at the end).")
    sequences: int = option(
        0, "Evaluate on the first N validation sequences (0: the whole split); the same N sequences whatever the "
           "number of processes.")
    at_start: bool = option(False, "Also evaluate before the first step (logged as step 0): the starting point, "
                                   "e.g. the response-only loss of a model before instruction tuning.")

    def validate(self) -> None:
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.sequences >= 0, "sequences", f"must be >= 0, got {self.sequences}")


@dataclass
class LoggingConfig(Section):
    """Console lines, metrics.jsonl, TensorBoard, MFU."""

    log_every: int = option(10, "Log metrics every N steps.")
    tensorboard: bool = option(True, "Write TensorBoard events to OUTPUT_DIR/tb.")
    peak_tflops: float = option(
        0.0, "Peak dense TFLOP/s of one device for MFU (0: known GPUs by name, else no MFU).")
    trackers: list[Literal["wandb", "mlflow"]] = option(
        [], "Experiment trackers beside metrics.jsonl and TensorBoard (optional packages: pip install wandb / "
            "mlflow-skinny). Each gets the resolved config at start and every metrics record.")
    wandb_project: str = option("cllama-dist", "W&B project.")
    wandb_mode: Literal["offline", "online"] = option(
        "offline", "W&B mode: offline writes under RUN/wandb (cluster nodes often have no internet; `wandb sync` later).")
    mlflow_tracking_uri: str = option("", "MLflow tracking URI (default: the folder RUN/mlruns, file store).")
    mlflow_experiment: str = option("cllama-dist", "MLflow experiment name.")

    def validate(self) -> None:
        check(self.log_every >= 1, "log_every", f"must be at least 1, got {self.log_every}")
        check(self.peak_tflops >= 0, "peak_tflops", f"must be >= 0, got {self.peak_tflops}")


# What each kind of stage trains, as the optimizer's parameter groups (trainer/engine.py: "lora", "embeddings").
TRAINABLE = {"embeddings": ("embeddings",), "lora+embeddings": ("lora", "embeddings"), "lora": ("lora",)}


@dataclass
class StageConfig(Section):
    """One stage of a staged schedule (``stages:`` in a run config)."""

    name: str = option("", "Name of the stage (in logs, metrics and the checkpoint's record).")
    trainable: Literal["embeddings", "lora+embeddings", "lora"] = option(
        "lora+embeddings", "What trains: embeddings (the embedding rows alone, the transformer frozen and LoRA "
                           "zero-effect), lora+embeddings, or lora (the embedding rows frozen).")
    steps: int = option(0, "Optimizer steps of this stage.")
    lr: float = option(0.0, "Peak learning rate of LoRA in this stage (0: optim.lr).")
    embedding_lr: float = option(0.0, "Peak learning rate of the embedding rows in this stage (0: optim.embedding_lr, "
                                      "or this stage's LoRA rate when that is 0 too).")
    warmup_steps: int = option(-1, "Linear warm-up steps at the start of this stage (-1: optim.warmup_steps, or "
                                   "optim.warmup_ratio of this stage's steps).")
    min_lr_ratio: float = option(-1.0, "Cosine decay over this stage ends at this share of its peak (-1: "
                                       "optim.min_lr_ratio).")

    @classmethod
    def from_text(cls, text: str) -> StageConfig:
        """A flag's value: ``NAME=TRAINABLE:STEPS`` (``--stages emb=embeddings:1000 lora=lora+embeddings:3000``,
        the rates from optim), or a YAML mapping (``'{name: emb, trainable: embeddings, steps: 1000}'``)."""
        from ..config import ConfigError, build
        from ..errors import UserError

        def built(values) -> StageConfig:
            try:
                return build(cls, values)
            except UserError as exc:  # "KEY: problem", to which the caller prefixes stages[i]
                raise ConfigError("", str(exc)) from None

        if text.lstrip().startswith("{"):
            import yaml

            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError("", f"expected a YAML mapping, got {text!r} ({exc})") from None
            return built(value)
        name, eq, rest = text.partition("=")
        kind, colon, steps = rest.rpartition(":")
        if not eq or not colon:
            raise ConfigError("", f"expected NAME=TRAINABLE:STEPS (e.g. emb=embeddings:1000) or a YAML mapping, "
                                  f"got {text!r}")
        return built({"name": name.strip(), "trainable": kind, "steps": steps})

    def validate(self) -> None:
        import re

        check(bool(self.name), "name", "is required (it names the stage in logs and checkpoints)")
        check(re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name) is not None, "name",
              f"{self.name!r} may hold only letters, digits, '_', '.', '+' and '-'")
        check(self.steps >= 1, "steps", f"stage {self.name!r}: must be at least 1, got {self.steps}")
        check(self.lr >= 0, "lr", f"stage {self.name!r}: must be >= 0, got {self.lr}")
        check(self.embedding_lr >= 0, "embedding_lr", f"stage {self.name!r}: must be >= 0, got {self.embedding_lr}")
        check(self.warmup_steps >= -1, "warmup_steps", f"stage {self.name!r}: must be >= 0 (or -1), got "
                                                       f"{self.warmup_steps}")
        check(self.min_lr_ratio == -1 or 0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
              f"stage {self.name!r}: must be in [0, 1] (or -1), got {self.min_lr_ratio}")


def check_stages(stages: list[StageConfig], max_steps: int) -> None:
    """The checks across stages (TrainConfig.validate): unique names, steps adding up to optim.max_steps."""
    if not stages:
        return
    names = [s.name for s in stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    check(not dup, "stages", f"stage names must be unique; repeated: {', '.join(dup)}")
    total = sum(s.steps for s in stages)
    check(not max_steps or total == max_steps, "stages",
          f"the stages' steps add up to {total} ({' + '.join(str(s.steps) for s in stages)}), but optim.max_steps is "
          f"{max_steps}; make them equal, or set optim.max_steps: 0 to take the sum")


@dataclass
class TrainConfig(Section):
    """Train LoRA + new embedding rows under DeepSpeed (cllama train)."""

    output_dir: PathStr = option("", "Run folder: resolved config, metrics, TensorBoard events, checkpoints "
                                     "(default runs/train).", aliases=["--out"])
    seed: int = option(0, "Seed of the data order, the new-row initialisation and LoRA initialisation.")
    model: ModelConfig = option(ModelConfig, "The base model, tokenizer and embeddings.")
    lora: LoraConfig = option(LoraConfig, "LoRA adapters.")
    data: DataConfig = option(DataConfig, "Shards and batching.")
    optim: OptimConfig = option(OptimConfig, "Optimizer and schedule.")
    engine: EngineConfig = option(EngineConfig, "DeepSpeed.")
    checkpoint: CheckpointConfig = option(CheckpointConfig, "Checkpoints and resume.")
    validation: ValidationConfig = option(ValidationConfig, "Validation.")
    logging: LoggingConfig = option(LoggingConfig, "Logging.")
    stages: list[StageConfig] = option(
        [], "A staged schedule (docs/stages.md): a list of {name, trainable, steps, lr, embedding_lr, warmup_steps, "
            "min_lr_ratio}, run in order, each stage from the previous one's last weights with its learning rate "
            "re-warmed and a fresh optimizer state; trainable is embeddings (the transformer frozen, LoRA "
            "zero-effect), lora+embeddings or lora. The steps add up to optim.max_steps (0: their sum). Empty: one "
            "stage training LoRA + the embeddings under optim's schedule.")

    def validate(self) -> None:
        check_stages(self.stages, self.optim.max_steps)
