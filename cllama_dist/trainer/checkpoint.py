"""Checkpoints: atomic saves, keep-last-K, resume (also on another number of processes).

Layout: RUN/checkpoints/step-00000100/ holds DeepSpeed's files (trainable parameters and their optimizer
state only: the frozen base comes from the base model), one rng-rankN.pt per process, trainer_state.json
(the ``TrainerState``) and, written last, files.json: every other file with its size and sha256. A save
goes to step-00000100.tmp/ and is renamed by rank 0 after every rank has written, so a crash mid-save
leaves a .tmp folder that is never taken for a checkpoint. The rename is the commit point.

"Valid" means: files.json is there and every file it lists is there with its size and sha256. A resume
with ``auto`` takes the newest valid checkpoint and says which newer ones it skipped and why (a rank's
file lost, a file truncated by a full disk); export applies the same check. Checkpoints written before
files.json existed are taken as they are, saying they cannot be verified.

A ZeRO checkpoint is tied to the data-parallel world size. Resuming on another size converts it once to
DeepSpeed's universal format (step-00000100.universal/, beside it) and loads that with
``load_universal``; the conversion also commits by rename.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
FILES = "files.json"
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
    base_model: dict = field(default_factory=dict)  # model/identity.py's fingerprint of the frozen base
    schedule: dict = field(default_factory=dict)    # what shapes the learning-rate curve (checked on resume)
    mixture: list = field(default_factory=list)     # data.sets' names, weights, sizes ([]: one folder; checked)
    config: dict = field(default_factory=dict)
    time: float = 0.0
    # Instruction tuning: the chat template of the shards ({name, sha256, source}; export installs it), and the
    # vocabulary of the model the run started from (the extended one when it started from a merged model).
    template: dict | None = None
    base_vocab: int = 0
    # data.document_mask: a resume with it switched would change what every later step attends to and predicts.
    document_mask: bool = False
    stage: str = ""  # a staged schedule: the stage of the last step taken ("": none; trainer/stages.py)

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_file_list(folder: Path) -> dict:
    """files.json: every file of the checkpoint (but itself) with its size and sha256."""
    files = {}
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.name != FILES):
        files[str(p.relative_to(folder))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    _write_json_atomic(folder / FILES, {"files": files})
    return files


def problem(path: Path, hashes: bool = True) -> str | None:
    """Why a checkpoint folder cannot be used, or None when it is valid."""
    if not (path / STATE).is_file():
        return f"no {STATE} (an interrupted save)"
    try:
        json.loads((path / STATE).read_text())
    except (json.JSONDecodeError, OSError) as exc:
        return f"{STATE} is unreadable ({exc})"
    listing = path / FILES
    if not listing.is_file():
        return None  # an older checkpoint: nothing to check against (said by the caller)
    try:
        files = json.loads(listing.read_text())["files"]
    except (json.JSONDecodeError, OSError, KeyError) as exc:
        return f"{FILES} is unreadable ({exc})"
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info["bytes"]:
            return f"{name} has {f.stat().st_size:,} bytes, {info['bytes']:,} were written (truncated?)"
        if hashes and _sha256(f) != info["sha256"]:
            return f"{name} does not match its sha256 (damaged)"
    return None


def verified(path: Path) -> bool:
    return (path / FILES).is_file()


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
        self.notes: list[str] = []  # what find_resume skipped, for the start-up lines

    def complete(self) -> list[Path]:
        return complete(self.run_dir)

    def find_resume(self) -> Path | None:
        """The checkpoint to resume from: ``auto`` = the newest valid one (None if there is none)."""
        resume = self.cfg.resume
        if resume == "auto":
            found = self.complete()
            for path in reversed(found):
                why = problem(path)
                if why is None:
                    if not verified(path):
                        self.notes.append(f"note: {path} has no {FILES} (written by an older version): not verified")
                    return path
                self.notes.append(f"note: skipping checkpoint {path}: {why}")
            if found:
                raise UserError(f"{self.run_dir} has checkpoints but none is valid ({'; '.join(self.notes)}); "
                                "use --resume '' in another output_dir to start afresh")
            return None
        if resume:
            path = Path(resume)
            if not path.is_dir():
                raise UserError(f"checkpoint.resume {resume}: no such checkpoint folder")
            why = problem(path)
            if why:
                raise UserError(f"cannot resume {path}: {why}")
            return path
        if self.complete():
            raise UserError(f"{self.run_dir} already has checkpoints ({self.complete()[-1].name}); use --resume auto "
                            "to continue it, or another output_dir to start afresh")
        return None

    @staticmethod
    def check_resumable(path: Path, state: dict[str, Any], expected: dict[str, Any]) -> None:
        """Refuse a checkpoint whose recorded settings differ from this run's, naming the setting."""
        for key, value in expected.items():
            if key in ("zero_stage", "schedule") or key not in state:  # older checkpoints lack newer keys
                continue
            if key == "tokenizer_sha256":
                from ..tokenizer.spm import same_tokenizer

                if not same_tokenizer(state[key], value):
                    raise UserError(f"cannot resume {path}: it was trained with the tokenizer {state[key][:16]}..., "
                                    f"this run's is {value['sha256'][:16]}...")
                continue
            if key == "base_model":
                if state[key].get("sha256") != value.get("sha256"):
                    raise UserError(f"cannot resume {path}: it was trained on the base {state[key].get('source')} "
                                    f"(fingerprint {state[key].get('sha256', '')[:12]}), this run's base is "
                                    f"{value.get('source')} (fingerprint {value.get('sha256', '')[:12]})")
                continue
            if state.get(key) != value:
                raise UserError(f"cannot resume {path}: its {key} is {state.get(key)!r}, this run's is {value!r}")
        stage, saved = expected.get("zero_stage"), state.get("zero_stage")
        if stage is not None and saved is not None and (saved == 3) != (stage == 3):
            # DeepSpeed lays out ZeRO-3 checkpoints differently from ZeRO-1/2 (one optimizer class, the same
            # files, read across the two: tests/integration/test_frozen_base.py); its loaders read only their own.
            # engine.frozen_base picks the stage of a ZeRO-3 config (resident = ZeRO-1, or ZeRO-2 in runs saved
            # before): both choices are named.
            def named(s: int) -> str:
                return f"ZeRO-{s} (engine.frozen_base: {'partitioned' if s == 3 else 'resident'})"

            raise UserError(f"cannot resume {path}: it was saved under {named(saved)}, this run is "
                            f"{named(stage)}; DeepSpeed's loaders read only their own stage's layout: keep the "
                            "run's DeepSpeed config and frozen_base")

    def save(self, engine, state: TrainerState, expected_bytes: int = 0) -> Path:
        """Collective: every rank must call it at the same step. A failure on any rank (a full disk) fails the
        save on every rank with one message; the partial .tmp folder is removed and earlier checkpoints stay.

        ``expected_bytes``: about how much the whole checkpoint takes. DeepSpeed's save is itself a collective
        (barriers around each rank's writes): a rank whose write fails inside it leaves the others waiting in
        its barrier until the collective timeout. So free space is checked first, on every rank, and a
        checkpoint that would not fit is refused before anything is written.
        """
        step = state.step
        final = self.root / step_name(step)
        tmp = self.root / (step_name(step) + ".tmp")

        def clear() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a save that crashed
                shutil.rmtree(tmp)

        def write_own_files() -> None:
            # Frozen parameters are excluded: they are the base model's and would multiply the checkpoint size.
            engine.save_checkpoint(str(self.root), tag=tmp.name, client_state={"cllama_step": step},
                                   save_latest=False, exclude_frozen_parameters=True)
            torch.save({"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                       tmp / f"rng-rank{dist.rank()}.pt")

        def commit() -> None:
            _write_json_atomic(tmp / STATE, {**dataclasses.asdict(state), "time": time.time()})
            write_file_list(tmp)  # last: its presence says every file listed was written whole
            if final.exists():  # a checkpoint of the same step from an earlier attempt
                shutil.rmtree(final)
            tmp.rename(final)
            for old in self.complete()[:-self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(universal_path(old), ignore_errors=True)

        def room() -> None:
            from ..files import free_bytes

            free = free_bytes(self.root)
            need = int(expected_bytes * 1.25) + (1 << 20)  # and room for the folder's small files
            if free is not None and expected_bytes and free < need:
                raise UserError(f"cannot save the checkpoint in {self.root}: it needs about {need / 1e6:,.0f} MB and "
                                f"{free / 1e6:,.1f} MB are free there (disk full); the last complete checkpoint is "
                                f"{(self.complete() or ['none'])[-1]}")

        try:
            dist.on_main("preparing the checkpoint folder", lambda: _guard(clear, tmp))
            dist.agree("checking the free space", room)
            dist.agree("writing the checkpoint", lambda: _guard(write_own_files, tmp))
            dist.on_main("committing the checkpoint", lambda: _guard(commit, tmp))
        except UserError:
            if dist.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def convert_to_universal(self, path: Path) -> Path:
        """Rank 0 converts (once); every rank waits for its outcome. Returns the universal folder."""
        out = universal_path(path)

        def convert() -> None:
            if (out / STATE).is_file():
                return
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
                   "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
                raise UserError(f"converting {path} to a universal checkpoint failed: {last}")
            shutil.copy(path / STATE, tmp / STATE)
            tmp.rename(out)

        dist.on_main("the universal conversion", lambda: _guard(convert, out))
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


def _guard(fn, where: Path):
    """Run a write step, turning OS and torch write failures into one line naming the path and the cause."""
    try:
        return fn()
    except OSError as exc:
        from ..files import os_error

        raise os_error(exc, where) from None
    except RuntimeError as exc:
        # torch.save's C++ writer reports a full disk as "basic_ios::clear: iostream error", then, while closing
        # the zip, "[enforce fail at inline_container.cc] unexpected pos": neither names the cause.
        chain, e = [], exc
        while e is not None:
            chain.append(str(e))
            e = e.__context__ or e.__cause__
        text = " ".join(chain)
        if any(w in text for w in ("write", "basic_ios", "iostream", "inline_container", "unexpected pos")):
            from ..files import free_bytes

            free = free_bytes(where)
            room = f"{free / 1e6:,.1f} MB free there" if free is not None else "free space unknown"
            raise UserError(f"cannot write the checkpoint {where}: the write failed ({room}: disk full?)") from None
        raise
