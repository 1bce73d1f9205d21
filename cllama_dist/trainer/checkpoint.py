"""Checkpoints: atomic saves, keep-last-K, resume (also on another number of processes).

Layout: RUN/checkpoints/step-00000100/ holds DeepSpeed's files (trainable parameters and their optimizer
state only: the frozen base comes from the base model), one rng-rankN.pt per process, trainer_state.json
(the ``TrainerState``) and, written last, files.json: every other file with its size and sha256. A save
goes to step-00000100.tmp/ and is renamed by rank 0 after every rank has written, so a crash mid-save
leaves a .tmp folder that is never taken for a checkpoint. The rename is the commit point.

"Valid" means: files.json is there and every file it lists is there with its size and sha256. A resume
with ``auto`` takes the newest valid checkpoint and says which newer ones it skipped and why (a rank's
file lost, a file truncated by a full disk), and moves those to RUN/damaged/ (kept, never deleted): their
steps are trained and saved again. Export applies the same check (``pick``). Checkpoints written before
files.json existed are taken as they are, saying they cannot be verified.

The Checkpointer also decides when to save (``due``: every save_every steps; ``needs_final``: at the end,
unless this run already holds its last step) and names the folders (``path``); the loop saves on a stop
request.

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
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..errors import UserError
from .config import CheckpointConfig
from .state import RunIdentity, TrainerState

STATE = "trainer_state.json"
FILES = "files.json"
DAMAGED = "damaged"  # RUN/damaged/: checkpoints a resume found damaged, set aside (never deleted)
_NAME = re.compile(r"^step-(\d{8})$")


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


def newest_valid(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest valid complete checkpoint of a run (None: none), and the newer ones skipped, with why."""
    skipped = []
    for path in reversed(complete(run_dir)):
        why = problem(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def set_aside(path: Path) -> Path:
    """Move a damaged checkpoint (and its universal conversion) to RUN/damaged/, never deleting it: out of the
    listing, so its step is saved again and export never takes it. Returns where it went."""
    aside = path.parent.parent / DAMAGED
    aside.mkdir(parents=True, exist_ok=True)
    target, n = aside / path.name, 1
    while target.exists() or universal_path(target).exists():  # the same step damaged before: both kept
        target, n = aside / f"{path.name}.{n}", n + 1
    path.rename(target)
    if universal_path(path).exists():
        universal_path(path).rename(universal_path(target))
    return target


def pick(run_dir: str | Path, step: int | None) -> tuple[Path, list[str]]:
    """The checkpoint to export: the newest valid one (with notes on the newer ones skipped), or the one of
    ``step``, checked file by file as a resume is; a damaged one is never taken."""
    found = complete(run_dir)
    aside = sorted(p.name for p in (Path(run_dir) / DAMAGED).glob("step-*")) if (Path(run_dir) / DAMAGED).is_dir() else []
    where = f" ({', '.join(aside)} set aside in {Path(run_dir) / DAMAGED} as damaged)" if aside else ""
    if not found:
        raise UserError(f"{run_dir} has no complete checkpoint (checkpoints/step-N with trainer_state.json){where}; "
                        "train first, or point --run at the run folder")
    if step:
        chosen = [p for p in found if p.name == step_name(step)]
        if not chosen:
            raise UserError(f"{run_dir} has no complete checkpoint at step {step}; it has "
                            f"{', '.join(p.name for p in found)}{where}")
        why = problem(chosen[0])
        if why:
            raise UserError(f"cannot export {chosen[0]}: {why}")
        return chosen[0], []
    path, skipped = newest_valid(run_dir)
    notes = [f"note: skipping checkpoint {p}: {why}" for p, why in skipped]
    if path is None:
        raise UserError(f"{run_dir} has no valid checkpoint: {'; '.join(notes)}")
    return path, notes


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
        self.skipped: list[Path] = []  # damaged checkpoints newer than the one find_resume chose
        self.last_saved: int | None = None  # the step of this run folder's checkpoint loaded or last written

    def complete(self) -> list[Path]:
        return complete(self.run_dir)

    def path(self, step: int) -> Path:
        return self.root / step_name(step)

    def find_resume(self) -> Path | None:
        """The checkpoint to resume from: ``auto`` = the newest valid one (None if there is none), saying which
        newer ones it skipped and why (``set_aside`` then moves those out of the way)."""
        resume = self.cfg.resume
        if resume == "auto":
            path, skipped = newest_valid(self.run_dir)
            self.notes += [f"note: skipping checkpoint {p}: {why}" for p, why in skipped]
            if path is None:
                if skipped:
                    raise UserError(f"{self.run_dir} has checkpoints but none is valid ({'; '.join(self.notes)}); "
                                    "use --checkpoint.resume '' in another output_dir to start afresh")
                return None
            if not verified(path):
                self.notes.append(f"note: {path} has no {FILES} (written by an older version): not verified")
            self.skipped = [p for p, _ in skipped]
            return path
        if resume:
            path = Path(resume)
            if not path.is_dir():
                raise UserError(f"checkpoint.resume {resume}: no such checkpoint folder")
            why = problem(path)
            if why:
                raise UserError(f"cannot resume {path}: {why}")
            return path
        if self.complete():
            raise UserError(f"{self.run_dir} already has checkpoints ({self.complete()[-1].name}); use --checkpoint.resume auto "
                            "to continue it, or another output_dir to start afresh")
        return None

    def set_aside(self) -> list[str]:
        """Move the damaged checkpoints ``find_resume`` skipped (newer than the one resumed) into RUN/damaged/,
        never deleting them: their steps are trained and saved again (a damaged folder left in place would
        count as the end's save), and export, which lists the run's checkpoints, can never take one."""
        moved = [f"{p.name} -> {set_aside(p)}" for p in self.skipped]
        self.skipped = []
        return [f"note: damaged checkpoints set aside (their steps are trained and saved again): {', '.join(moved)}"] \
            if moved else []

    # When to save (torchtitan's CheckpointManager decides the same way): every save_every steps, on a stop
    # request (the loop asks, then saves with reason "signal"), and at the end unless the last step is saved.

    def due(self, step: int, last: int) -> bool:
        """A periodic save at ``step`` (the last step's save is the end's)."""
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0 and step < last

    def needs_final(self, step: int) -> bool:
        """The end of the run: its last step is not yet saved by this run (nor resumed from a checkpoint of it)."""
        return self.last_saved != step

    @staticmethod
    def check_resumable(path: Path, state: dict[str, Any], identity: RunIdentity) -> None:
        """Refuse a checkpoint whose recorded settings differ from this run's, naming the setting."""
        identity.check(path, state)

    def save(self, engine, state: TrainerState, expected_bytes: int = 0) -> Path:
        """Collective: every rank must call it at the same step. A failure on any rank (a full disk) fails the
        save on every rank with one message; the partial .tmp folder is removed and earlier checkpoints stay.

        ``expected_bytes``: about how much the whole checkpoint takes. DeepSpeed's save is itself a collective
        (barriers around each rank's writes): a rank whose write fails inside it leaves the others waiting in
        its barrier until the collective timeout. So free space is checked first, on every rank, and a
        checkpoint that would not fit is refused before anything is written.
        """
        step = state.step
        final = self.path(step)
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
        self.last_saved = step
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
        if path.parent.resolve() == self.root.resolve():  # this run's own step: its end need not save it again
            self.last_saved = state["step"]
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
