"""Checkpoints: atomic saves, keep-last-K, resume (also on another number of processes).

Layout: RUN/checkpoints/step-00000100/ holds DeepSpeed's files (trainable parameters and their optimizer
state only: the frozen base comes from the base model), one rng-rankN.pt per process, and
trainer_state.json (the ``TrainerState``). A save goes to step-00000100.tmp/ and is renamed by rank 0
after every rank has written, so a crash mid-save leaves a .tmp folder that is never taken for a
checkpoint. The rename is the commit point; trainer_state.json is written just before it.

A ZeRO checkpoint is tied to the data-parallel world size. Resuming on another size converts it once to
DeepSpeed's universal format (step-00000100.universal/, beside it) and loads that with
``load_universal``; the conversion also commits by rename.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..errors import UserError
from .config import CheckpointConfig

STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainerState:
    """What a checkpoint carries besides DeepSpeed's tensors: where the run stands and what it was trained
    with (checked on resume, and read by export)."""

    step: int
    world_size: int
    global_batch: int
    samples_consumed: int
    tokenizer_sha256: str
    orig_vocab: int
    new_vocab: int
    embeddings: str
    block_size: int
    zero_stage: int
    reason: str
    config: dict = field(default_factory=dict)
    time: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainerState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def universal_path(path: Path) -> Path:
    return path.with_name(path.name + ".universal")


def complete(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    r = root(run_dir)
    if not r.is_dir():
        return []
    found = [p for p in r.iterdir() if _NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def read_state(path: str | Path) -> dict[str, Any]:
    p = Path(path) / STATE
    if not p.is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {STATE}); an interrupted save leaves only .tmp folders")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p} is corrupt: {exc}") from None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _unshare_adam_steps(optimizer) -> None:
    # DeepSpeed's universal loader (stage 3) gives every parameter group the *same* 'step' tensor, and
    # torch's AdamW increments it in place once per group: with two groups the bias correction would
    # advance two steps per update. Measured here: the loss after a 2 -> 1 process resume drifted by
    # 1.5e-3 within two steps; with the copies it matches.
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


class Checkpointer:
    """Save, find, check, load and convert the checkpoints of one run folder."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig):
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.root = root(run_dir)

    def complete(self) -> list[Path]:
        return complete(self.run_dir)

    def find_resume(self) -> Path | None:
        """The checkpoint to resume from: ``auto`` = newest complete one (None if there is none)."""
        resume = self.cfg.resume
        if resume == "auto":
            found = self.complete()
            return found[-1] if found else None
        if resume:
            path = Path(resume)
            read_state(path)  # refuse an incomplete one clearly
            return path
        if self.complete():
            raise UserError(f"{self.run_dir} already has checkpoints ({self.complete()[-1].name}); use --resume auto "
                            "to continue it, or another output_dir to start afresh")
        return None

    @staticmethod
    def check_resumable(path: Path, state: dict[str, Any], expected: dict[str, Any]) -> None:
        """Refuse a checkpoint whose recorded settings differ from this run's, naming the setting."""
        for key, value in expected.items():
            if key == "zero_stage":
                continue
            if state.get(key) != value:
                raise UserError(f"cannot resume {path}: its {key} is {state.get(key)!r}, this run's is {value!r}")
        stage = expected.get("zero_stage")
        if stage is not None and state.get("zero_stage", stage) != stage:
            # DeepSpeed lays out ZeRO-2 and ZeRO-3 checkpoints differently; its loaders read only their own.
            raise UserError(f"cannot resume {path}: it was saved under ZeRO-{state['zero_stage']}, this run is "
                            f"ZeRO-{stage} (keep the DeepSpeed config and single_process_zero2 of the run)")

    def save(self, engine, state: TrainerState) -> Path:
        """Collective: every rank must call it at the same step."""
        step = state.step
        final = self.root / step_name(step)
        tmp = self.root / (step_name(step) + ".tmp")
        if dist.is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a save that crashed
                shutil.rmtree(tmp)
        dist.barrier()
        # Frozen parameters are excluded: they are the base model's and would multiply the checkpoint size.
        engine.save_checkpoint(str(self.root), tag=tmp.name, client_state={"cllama_step": step}, save_latest=False,
                               exclude_frozen_parameters=True)
        torch.save({"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / f"rng-rank{dist.rank()}.pt")
        dist.barrier()
        if dist.is_main():
            _write_json_atomic(tmp / STATE, {**dataclasses.asdict(state), "time": time.time()})
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete()[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(universal_path(old), ignore_errors=True)
        dist.barrier()
        return final

    def convert_to_universal(self, path: Path) -> Path:
        """Rank 0 converts (once); every rank waits. Returns the universal folder."""
        out = universal_path(path)
        if dist.is_main() and not (out / STATE).is_file():
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                   "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise UserError(f"converting {path} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")
            shutil.copy(path / STATE, tmp / STATE)
            tmp.rename(out)
        dist.barrier()
        return out

    def load(self, engine, path: Path, universal: bool) -> dict[str, Any]:
        """Load trainable weights and optimizer state; restore this rank's RNG when the world size is the same."""
        if universal:
            self.convert_to_universal(path)
        state = read_state(path)
        load_dir = universal_path(path) if universal else path
        # DeepSpeed's universal loader copies group 0's hyperparameters into every param group; the groups'
        # own settings (here: lr and weight decay of the embedding rows) are put back after the load.
        settings = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
        loaded, _ = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_module_strict=False,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise UserError(f"DeepSpeed could not load {load_dir}")
        if universal:
            _unshare_adam_steps(engine.optimizer)
            for group, own in zip(engine.optimizer.param_groups, settings):
                group.update(own)
        rng = path / f"rng-rank{dist.rank()}.pt"
        if not universal and rng.is_file():
            saved = torch.load(rng, weights_only=False)
            torch.set_rng_state(saved["torch"])
            if saved["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["cuda"])
        return state
