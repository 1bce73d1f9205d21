"""The training loop: extend the vocabulary, train LoRA + new rows under DeepSpeed, evaluate, log, save.

    deepspeed --num_gpus 8 cllama_dist/train.py --config configs/llama-7b.yaml
    torchrun --nproc_per_node 8 cllama_dist/train.py --config configs/llama-7b.yaml
    srun cllama-train --config ...          (SLURM_* mapped in distributed.py)

One step = ``accum`` micro-batches per process, then one optimizer update. The batch arithmetic lives in
``Plan``; the data order in ``data/loader.py``; checkpoints in ``checkpoint.py``; every collective in
``distributed.py``.
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import PROJECT_ROOT, checkpoint, distributed as dist
from .config import TrainConfig, to_dict
from .data.loader import GlobalOrder, TokenBlocks, eval_batches, step_positions
from .data.shards import check_manifest, load_manifest, verify_shards
from .errors import UserError
from .model import flops
from .progress import Progress

EXIT_DONE, EXIT_STOPPED, EXIT_NONFINITE = 0, 3, 4
STOP_FILE = "STOP"  # touched by slurm/pretrain.sh when Slurm signals the batch shell


# ------------------------------------------------------------------------------------------------
# Set-up


@dataclass(frozen=True)
class Plan:
    """The run's batch arithmetic, computed once and printed."""

    world: int
    micro: int
    accum: int
    block: int
    max_steps: int
    train_sequences: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.block

    @classmethod
    def make(cls, cfg: TrainConfig, world: int, block: int, train_sequences: int) -> "Plan":
        if cfg.global_batch_size:
            if cfg.global_batch_size % (cfg.micro_batch_size * world):
                raise UserError(f"global_batch_size {cfg.global_batch_size} is not a multiple of micro_batch_size "
                                f"{cfg.micro_batch_size} x {world} processes")
            accum = cfg.global_batch_size // (cfg.micro_batch_size * world)
        else:
            accum = cfg.grad_accum
        g = cfg.micro_batch_size * accum * world
        steps = cfg.max_steps or max(1, train_sequences // g)
        return cls(world, cfg.micro_batch_size, accum, block, steps, train_sequences)

    def describe(self) -> str:
        epochs = self.max_steps * self.global_batch / max(self.train_sequences, 1)
        return (f"{self.world} processes x micro-batch {self.micro} x accumulation {self.accum} = {self.global_batch} "
                f"sequences x {self.block} tokens = {self.tokens_per_step:,} tokens per step; {self.max_steps:,} steps "
                f"= {self.max_steps * self.tokens_per_step:,} tokens ({epochs:.2f} epochs of {self.train_sequences:,} sequences)")


def lr_factor(step: int, cfg: TrainConfig, max_steps: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio at max_steps."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def read_tokenizer(cfg: TrainConfig, model_vocab: int) -> tuple[dict, int, dict]:
    """The merged tokenizer's fingerprint, the base vocabulary size it extends, and its merge report."""
    from .tokenizer import spm

    if not cfg.tokenizer:
        raise UserError("tokenizer is required: the merged tokenizer folder")
    fp = spm.fingerprint(cfg.tokenizer)
    report_path = spm.model_path(cfg.tokenizer).parent / "merge_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    orig = report.get("base", {}).get("vocab_size", model_vocab)
    if cfg.extended_vocab and cfg.extended_vocab != fp["vocab_size"]:
        raise UserError(f"extended_vocab is {cfg.extended_vocab:,} but tokenizer {cfg.tokenizer} has "
                        f"{fp['vocab_size']:,} pieces (len(tokenizer); hazard H2)")
    if fp["vocab_size"] <= orig:
        raise UserError(f"tokenizer {cfg.tokenizer} has {fp['vocab_size']:,} pieces, not more than the base's "
                        f"{orig:,}: there is no vocabulary to extend")
    return fp, orig, report


def subword_ids(report: dict, cfg: TrainConfig, orig: int, new: int):
    from .model.vocab import subword_ids_for
    from .tokenizer import spm

    base_path = report.get("base", {}).get("path")
    if not base_path or not Path(base_path).exists():
        raise UserError(f"new_row_init: subword needs the base tokenizer named in the merge report "
                        f"({base_path or 'none recorded'}), which is not readable here")
    base, merged = spm.processor(base_path), spm.processor(cfg.tokenizer)
    return subword_ids_for([merged.id_to_piece(i) for i in range(orig, new)], base)


def deepspeed_config(cfg: TrainConfig, plan: Plan, dtype: str, universal: bool) -> dict[str, Any]:
    path = Path(cfg.deepspeed_config)
    if not path.is_file() and not path.is_absolute() and (PROJECT_ROOT / path).is_file():
        path = PROJECT_ROOT / path
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config {cfg.deepspeed_config} not found") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    _merge(ds, cfg.deepspeed_overrides)
    filled = {
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": cfg.clip_grad,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise UserError(f"{path}: {key} is {ds[key]}, but the run config gives {value}; set it to \"auto\"")
        ds[key] = value
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") == 3 and plan.world == 1 and cfg.single_process_zero2:
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


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def _param_groups(model, cfg: TrainConfig) -> list[dict]:
    lora, emb = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (emb if ("weight_new" in name or "weight_base" in name) else lora).append(p)
    groups = [{"params": lora, "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr, "name": "lora"},
              # No weight decay on embedding rows: it would pull the new rows toward zero (and, in a
              # masked design, move the old ones: hazard H3).
              {"params": emb, "weight_decay": 0.0, "peak_lr": cfg.embedding_lr or cfg.lr, "name": "embeddings"}]
    return [g for g in groups if g["params"]]


# ------------------------------------------------------------------------------------------------
# Logging


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (of one type: "train" or "eval"), in order; [] before the first.

    Each step appears once: on resume the Logger drops the records past the checkpoint. A last line still
    being written by a live run is left out.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return [r for r in records if kind is None or r.get("type") == kind]


class Logger:
    """Rank 0 only: metrics.jsonl, TensorBoard events and console lines."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int):
        self.main = dist.is_main()
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not self.main:
            return
        if self.path.exists() and resume_step >= 0:
            # Drop records past the checkpoint: those steps are about to be trained again.
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step >= 0 else None)
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "type") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ------------------------------------------------------------------------------------------------
# The run


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = dist.init()
        self.run_dir = Path(cfg.output_dir or "runs/train")
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier attempt
        dist.barrier()

        from .model.adapters import DTYPES, build_model, count_parameters, load_llama_config

        # Everything that can be refused is checked before the model is built.
        llama = load_llama_config(cfg)
        self.fingerprint, self.orig_vocab, report = read_tokenizer(cfg, llama.vocab_size)
        self.new_vocab = self.fingerprint["vocab_size"]
        if not cfg.data:
            raise UserError("data is required: the preprocessor's output folder")
        manifest = load_manifest(cfg.data)
        block = cfg.block_size or manifest["block_size"]
        check_manifest(manifest, self.fingerprint, block, where=f"shards in {cfg.data}")
        if block > llama.max_position_embeddings:
            raise UserError(f"block size {block} exceeds the model's max_position_embeddings {llama.max_position_embeddings}")
        if dist.is_main():
            verify_shards(cfg.data, manifest, checksums=False)
        self.train_blocks = TokenBlocks(cfg.data, manifest, "train")
        self.val_blocks = TokenBlocks(cfg.data, manifest, "validation")
        self.order = GlobalOrder(len(self.train_blocks), cfg.seed)
        self.plan = Plan.make(cfg, dist.world_size(), block, len(self.train_blocks))

        self.resume_from = checkpoint.find_resume(self.run_dir, cfg.resume)
        self.resume_state = checkpoint.read_state(self.resume_from) if self.resume_from else None
        universal = False
        if self.resume_state:
            self._check_resumable(self.resume_state)
            universal = self.resume_state["world_size"] != self.plan.world

        self.dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if self.device.startswith("cuda") else "fp32")
        self.ds_config = deepspeed_config(cfg, self.plan, self.dtype, universal)
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if self.resume_state and self.resume_state.get("zero_stage", stage) != stage:
            # DeepSpeed lays out ZeRO-2 and ZeRO-3 checkpoints differently; its loaders read only their own.
            raise UserError(f"cannot resume {self.resume_from}: it was saved under ZeRO-{self.resume_state['zero_stage']}, "
                            f"this run is ZeRO-{stage} (keep the DeepSpeed config and single_process_zero2 of the run)")
        zero3 = stage == 3
        sub = subword_ids(report, cfg, self.orig_vocab, self.new_vocab) if cfg.new_row_init == "subword" else None
        model, self._keep_alive = build_model(cfg, self.orig_vocab, self.new_vocab, DTYPES[self.dtype],
                                              self.ds_config if zero3 else None, sub)
        self.counts = count_parameters(model)

        import deepspeed

        optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.start_step = 0
        if self.resume_from:
            if universal:
                checkpoint.convert_to_universal(self.resume_from)
            checkpoint.load(self.engine, self.resume_from, universal)
            self.start_step = self.resume_state["step"]

        self.flops = flops.run_flops(llama, self.orig_vocab, self.new_vocab, cfg.embeddings, block, self.counts.lora,
                                     cfg.gradient_checkpointing)
        peak = cfg.peak_tflops or (flops.peak_tflops(torch.cuda.get_device_name()) if self.device.startswith("cuda") else 0.0)
        self.peak_flops = peak * 1e12
        self.logger = Logger(self.run_dir, cfg.tensorboard, self.start_step if self.resume_from else -1)
        if dist.is_main():
            self._write_run_files()
        self._announce()

    def _check_resumable(self, state: dict) -> None:
        mine = {"global_batch": self.plan.global_batch, "tokenizer_sha256": self.fingerprint["sha256"],
                "embeddings": self.cfg.embeddings, "block_size": self.plan.block}
        for key, value in mine.items():
            if state.get(key) != value:
                raise UserError(f"cannot resume {self.resume_from}: its {key} is {state.get(key)!r}, this run's is "
                                f"{value!r}")

    def _write_run_files(self) -> None:
        import yaml

        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False, allow_unicode=True))
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")

    def _announce(self) -> None:
        c, say = self.counts, self.logger.say
        say(f"cllama train: {self.plan.describe()}")
        say(f"  vocabulary {self.orig_vocab:,} -> {self.new_vocab:,} ({self.cfg.embeddings}, init {self.cfg.new_row_init}); "
            f"DeepSpeed ZeRO-{self.ds_config.get('zero_optimization', {}).get('stage', 0)}, {self.dtype}, "
            f"gradient checkpointing {'on' if self.cfg.gradient_checkpointing else 'off'}, device {self.device}")
        say(f"  parameters: total {c.total:,}, LoRA {c.lora:,}, new rows {c.new_rows:,}, trainable {c.trainable:,} "
            f"({100 * c.share:.2f}%); optimizer state {c.optimizer_bytes(self.dtype != 'fp32') / 2**20:,.1f} MiB")
        say(f"  FLOPs per token: {self.flops['actual'] / 1e9:,.3f} G as computed (LoRA: ~4N + recompute + attention), "
            f"{self.flops['conventional'] / 1e9:,.3f} G conventional (6N + 12LHs)"
            + ("" if self.peak_flops else "; MFU not reported (unknown device peak: set peak_tflops)"))
        if self.resume_from:
            say(f"  resumed from {self.resume_from} at step {self.start_step} (sample {self.start_step * self.plan.global_batch:,})")

    # -- one step ------------------------------------------------------------------------------------

    def _batch(self, blocks: TokenBlocks, indices: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(blocks.take(indices))
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _set_lr(self, step: int) -> float:
        f = lr_factor(step, self.cfg, self.plan.max_steps)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = g["peak_lr"] * f
        return self.cfg.lr * f

    def _discard_gradients(self) -> None:
        # Gradients of earlier micro-batches of a skipped step are already reduced into ZeRO's partitions.
        opt = self.engine.optimizer
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "averaged_gradients"):
            opt.averaged_gradients = {}

    def train_step(self, step: int) -> float | None:
        """One optimizer step; returns the mean loss over all processes, or None when it was skipped."""
        positions = step_positions(step, self.plan.global_batch, self.plan.micro, dist.rank(), self.plan.world)
        losses = []
        for k, pos in enumerate(positions):
            x = self._batch(self.train_blocks, self.order.indices(pos))
            self.engine.set_gradient_accumulation_boundary(k == len(positions) - 1)
            loss = self.engine(input_ids=x, labels=x).loss
            if step + 1 in self.cfg.fault_nonfinite_steps and k == len(positions) - 1:
                loss = loss * float("nan")  # testing aid; on the last micro-batch, so earlier gradients exist
            # All ranks agree before anyone runs backward: a rank alone skipping would hang the others.
            if dist.any_true(not torch.isfinite(loss).item()):
                if k:
                    self._discard_gradients()
                return None
            self.engine.backward(loss)
            losses.append(loss.item())
        self.engine.step()
        return dist.mean(sum(losses) / len(losses))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if len(self.val_blocks) == 0:
            return None
        self.engine.eval()
        loss_sum = weight_sum = 0.0
        n = min(len(self.val_blocks), self.cfg.eval_sequences or len(self.val_blocks))
        for idx, w in eval_batches(n, self.plan.micro, dist.rank(), self.plan.world):
            x = self._batch(self.val_blocks, idx)
            logits = self.engine(input_ids=x).logits
            per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="none")
            per_seq = per_token.view(x.shape[0], -1).mean(dim=1).double().cpu().numpy()
            loss_sum += float((per_seq * w).sum())
            weight_sum += float(w.sum())
        self.engine.train()
        loss = dist.total(loss_sum) / dist.total(weight_sum)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    # -- the loop ---------------------------------------------------------------------------------------

    def save(self, step: int, reason: str) -> Path:
        state = {"global_batch": self.plan.global_batch, "samples_consumed": step * self.plan.global_batch,
                 "tokenizer_sha256": self.fingerprint["sha256"], "orig_vocab": self.orig_vocab,
                 "new_vocab": self.new_vocab, "embeddings": self.cfg.embeddings, "block_size": self.plan.block,
                 "zero_stage": self.ds_config.get("zero_optimization", {}).get("stage", 0),
                 "reason": reason, "config": to_dict(self.cfg), "time": time.time()}
        path = checkpoint.save(self.engine, self.run_dir, step, state, self.cfg.keep_last)
        self.logger.say(f"saved checkpoint {path} ({reason})")
        return path

    def run(self) -> int:
        cfg, plan = self.cfg, self.plan
        stop = dist.StopFlag(self.run_dir / STOP_FILE)
        bar = Progress("train", total=plan.max_steps, unit="step", enabled=dist.is_main())
        bar.update(self.start_step)
        step, bad_in_row, code = self.start_step, 0, EXIT_DONE
        window_t, window_steps, last_eval = time.perf_counter(), 0, None
        try:
            while step < plan.max_steps:
                lr = self._set_lr(step)
                loss = self.train_step(step)
                step += 1
                window_steps += 1
                if loss is None:
                    bad_in_row += 1
                    self.logger.say(f"step {step}: non-finite loss, step skipped ({bad_in_row} in a row)")
                    self.logger.log({"type": "train", "step": step, "loss": float("nan"), "skipped": True})
                    if bad_in_row >= cfg.max_nonfinite_steps:
                        self.logger.say(f"stopping: {bad_in_row} non-finite losses in a row (max_nonfinite_steps); "
                                        "the checkpoint holds the last good weights")
                        self.save(step, "non-finite loss")
                        code = EXIT_NONFINITE
                        break
                    continue
                bad_in_row = 0
                grad_norm = self.engine.get_global_grad_norm()
                record = {"type": "train", "step": step, "loss": loss, "lr": lr,
                          "grad_norm": float(grad_norm) if grad_norm is not None else None}
                if step % cfg.log_every == 0 or step == plan.max_steps:
                    elapsed = time.perf_counter() - window_t
                    tps = window_steps * plan.tokens_per_step / elapsed
                    record.update({"tokens_per_s": tps, "tokens_per_s_per_device": tps / plan.world,
                                   "step_time_s": elapsed / window_steps,
                                   "peak_memory_gib": peak_memory_bytes(self.device) / 2**30})
                    if self.peak_flops:
                        record["mfu"] = tps / plan.world * self.flops["actual"] / self.peak_flops
                        record["mfu_conventional"] = tps / plan.world * self.flops["conventional"] / self.peak_flops
                    self.logger.say(self._line(record))
                    window_t, window_steps = time.perf_counter(), 0
                self.logger.log(record)
                bar.update(1, f"loss {loss:.4f}")
                if cfg.eval_every and step % cfg.eval_every == 0:
                    last_eval = self._eval_and_log(step)
                if stop.should_stop():
                    self.logger.say(f"stop requested (signal or {STOP_FILE} file): saving at step {step} and exiting")
                    self.save(step, "signal")
                    code = EXIT_STOPPED
                    break
                if cfg.save_every and step % cfg.save_every == 0 and step < plan.max_steps:
                    self.save(step, "periodic")
                    window_t = time.perf_counter()  # a save is not training time
            else:
                if last_eval is None or last_eval != step:
                    self._eval_and_log(step)
                saved = checkpoint.complete(self.run_dir)
                if not saved or saved[-1].name != checkpoint.step_name(step):
                    self.save(step, "end")
        finally:
            bar.close()
            stop.restore()
            self.logger.close()
        return code

    def _eval_and_log(self, step: int) -> int:
        result = self.evaluate()
        if result is not None:
            self.logger.log({"type": "eval", "step": step, **result})
            self.logger.say(f"step {step}: validation loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}")
        return step

    @staticmethod
    def _line(r: dict[str, Any]) -> str:
        parts = [f"step {r['step']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
        if r.get("grad_norm") is not None:
            parts.append(f"grad norm {r['grad_norm']:.3f}")
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_s_per_device']:,.0f}/device)")
        if "mfu" in r:
            parts.append(f"MFU {100 * r['mfu']:.1f}% (conventional {100 * r['mfu_conventional']:.1f}%)")
        parts.append(f"peak mem {r['peak_memory_gib']:.2f} GiB")
        return ", ".join(parts)


def train(cfg: TrainConfig) -> int:
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        dist.barrier()
