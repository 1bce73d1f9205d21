"""Running a kind (kind.py): a task's groups encoded in a pool of workers and committed one by one, resume,
clean-up after a failure, and finalize."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ... import files
from ...errors import UserError
from ...files import Lock
from ...progress import Progress
from ..corpus import Source
from ..shards.format import MANIFEST
from ..shards.verify import verify_shards
from .folder import (COMMANDS, FINALIZE_LOCK, PLAN, SPILL, group_record_path, live_locks_refuse, open_output,
                     read_json, shard_path, spill_path, take, take_plan_lock, write_json)
from .kind import ChunkEncoder, ConfigT, Kind
from .plan import SPLITS, chunk_bytes, resolve_task, task_groups


def prepare(kind: Kind, cfg: ConfigT) -> dict:
    """Check everything and create the output folder with its plan, without encoding anything.

    Run once before submitting an array of tasks: a wrong flag fails here instead of in every task.
    """
    cfg = resolve_task(cfg)
    work = kind.plan(cfg)
    open_output(cfg, work.plan, kind, hold_task=False)
    return work.plan


def run_task(kind: Kind, cfg: ConfigT) -> dict:
    """Encode this task's groups (all of them when num_tasks is 1), holding this task's lock. Returns what it
    did."""
    cfg = resolve_task(cfg)
    work = kind.plan(cfg)
    lock = open_output(cfg, work.plan, kind, hold_task=True)
    try:
        return run_groups(kind, cfg, work.plan, work.sources, work.encoder)
    finally:
        lock.release()  # type: ignore[union-attr]


def preprocess(kind: Kind, cfg: ConfigT) -> dict | None:
    """Run this task; finalize as well when it is the only task."""
    cfg = resolve_task(cfg)
    run_task(kind, cfg)
    if cfg.num_tasks == 1:
        return finalize(kind, cfg.output, verify=False)
    return None


# -------------------------------------------------------------------------------------------- workers

_worker: ChunkEncoder | None = None  # this process's chunk encoder, once started


def _start(encoder: ChunkEncoder) -> None:
    global _worker
    encoder.start()
    _worker = encoder


def _encode(job: tuple[int, list, str]) -> dict:
    index, chunk, spill = job
    return _worker.encode(index, chunk, Path(spill))  # type: ignore[union-attr]


def spill_write(f, array: np.ndarray) -> None:
    """Append ``array``'s bytes to the spill file ``f``; an OS error (a full disk) in one line naming it."""
    try:
        # file.write, not ndarray.tofile: tofile loses the errno of a failed write (a full disk).
        f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
    except OSError as exc:
        raise files.os_error(exc, f.name) from None


# ------------------------------------------------------------------------------------------ the task

def run_groups(kind: Kind, cfg: ConfigT, plan: dict, sources: list[Source], encoder: ChunkEncoder) -> dict:
    """This task's groups (resolved ``cfg.num_tasks`` / ``cfg.task_id``): skip the committed ones, encode the
    chunks of the others in a pool of ``cfg.workers`` and write and commit them group by group, in order. A
    failure removes the partial files of uncommitted groups; a full disk says so in one line."""
    out = Path(cfg.output)
    mine = task_groups(len(plan["groups"]), cfg.num_tasks, cfg.task_id)
    pending = []
    for g in mine:
        if group_record_path(out, g).is_file():
            problem = _committed_problem(out, g)
            if problem is None:
                continue
            print(f"note: redoing group {g} of {out}: {problem}", file=sys.stderr, flush=True)
            group_record_path(out, g).unlink()
        pending.append(g)
    # Anything half-written by a killed run of this task is redone from its group's start.
    _discard_uncommitted(out, plan, pending)
    work = [(c, plan["chunks"][c]) for g in pending for c in range(*plan["groups"][g])]
    total_bytes = sum(chunk_bytes(ch, sources) for _, ch in work)
    workers = cfg.workers or os.cpu_count() or 1
    t0 = time.time()
    done_tokens = 0
    if work:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        try:
            with Progress(f"{kind.label} task {cfg.task_id}/{cfg.num_tasks}", total=total_bytes, unit="B") as bar:
                jobs = [(c, ch, str(spill_path(out, c))) for c, ch in work]
                if workers == 1:
                    _start(encoder)
                    done_tokens = _commit(kind, out, plan, pending, map(_encode, jobs), sources, bar)
                else:
                    with ctx.Pool(workers, initializer=_start, initargs=(encoder,)) as pool:
                        done_tokens = _commit(kind, out, plan, pending, pool.imap(_encode, jobs), sources, bar)
        except BaseException as exc:
            # The workers are stopped (the pool is closed) before this runs: nothing writes any more.
            _discard_uncommitted(out, plan, pending)
            err = files.os_error(exc, getattr(exc, "filename", None) or out) if isinstance(exc, OSError) else exc
            if _space_error(err):
                kept = sum(group_record_path(out, g).is_file() for g in mine)
                raise UserError(f"{err}; {kept} of this task's {len(mine)} groups are committed and kept, the partial "
                                "files removed: free some space and run the same command again to resume") from None
            if err is exc:
                raise
            raise err from None
    return {"task_id": cfg.task_id, "num_tasks": cfg.num_tasks, "groups": list(mine), "ran": pending,
            "tokens": done_tokens, "seconds": round(time.time() - t0, 2), "input_bytes": total_bytes}


def _commit(kind: Kind, out: Path, plan: dict, pending: list[int], results: Iterator[dict], sources: list[Source],
            bar: Progress) -> int:
    """The ordered chunk results written group by group; each group committed by its record, written last."""
    total = 0
    it = iter(results)
    for g in pending:
        first, last = plan["groups"][g]
        writer = kind.group_writer(out, plan, g)
        try:
            for c in range(first, last):
                total += writer.add(c, next(it))
                bar.update(chunk_bytes(plan["chunks"][c], sources), extra=f"{total / 1e6:.1f}M tokens")
            record = writer.close()
        except BaseException:
            writer.abort()
            raise
        write_json(group_record_path(out, g), {"group": g, "chunks": [first, last], **record})
    return total


def _committed_problem(out: Path, g: int) -> str | None:
    """Why group ``g``'s record cannot be trusted (its shard missing or of another size), or None."""
    rec = read_json(group_record_path(out, g))
    if rec is None:
        return "its record is unreadable"
    for split in SPLITS:
        shard = (rec.get("shards") or {}).get(split)
        if shard:
            p = out / shard["file"]
            try:
                size = p.stat().st_size
            except FileNotFoundError:
                return f"its shard {p} is missing"
            if size != shard["bytes"]:
                return f"its shard {p} has {size:,} bytes, its record says {shard['bytes']:,}"
    return None


def _discard_uncommitted(out: Path, plan: dict, groups: list[int]) -> None:
    """Delete what the groups without a record left behind: partial shards and spill files."""
    for g in groups:
        if group_record_path(out, g).is_file():
            continue
        for split in SPLITS:
            p = shard_path(out, split, g)
            for q in (p, p.with_name(p.name + ".tmp")):
                q.unlink(missing_ok=True)
        for c in range(*plan["groups"][g]):
            for f in (out / SPILL).glob(f"{spill_path(out, c).name}.*"):
                f.unlink(missing_ok=True)


def _space_error(exc: BaseException) -> bool:
    """A full disk or quota (files.os_error words them so)."""
    return isinstance(exc, UserError) and any(w in str(exc) for w in (": disk full", ": disk quota exceeded"))


# ------------------------------------------------------------------------------------------ finalize

def finalize(kind: Kind, output: str, verify: bool = True) -> dict:
    """Check that every group of the plan is committed, let the kind make the manifest, verify the shards
    against it (with ``verify``, their sha256 too), write it and drop the spill folder.

    Holds the folder's finalize lock, and refuses while any task still holds its lock (naming the task and its
    holder): a task still writing would leave its group out of the manifest, or change it afterwards.
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"the {kind.folder_kind} output {out} is a file, not a folder")
    if not (out / PLAN).is_file():
        raise UserError(f"{out} holds no {PLAN}: run `{kind.command}` (or its array tasks) first")
    held = files.folder_kind(out)
    if held != kind.folder_kind:
        other = COMMANDS.get(held or "")
        raise UserError(f"{out} holds {held or 'unmarked'} output, not {kind.folder_kind}: "
                        + (f"finalize it with `{other} finalize`" if other else f"not made by `{kind.command}`"))
    plan_lock = take_plan_lock(out, kind)
    try:
        live_locks_refuse(out, "finalize", kind, finalize_too=False)
        lock = take(Lock(out / FINALIZE_LOCK, f"{kind.label} finalize"))
    finally:
        plan_lock.release()
    try:
        plan, records = _committed_records(out, kind)
        manifest = kind.manifest(out, plan, records)
        verify_shards(out, manifest, checksums=verify)
        write_json(out / MANIFEST, manifest)
        shutil.rmtree(out / SPILL, ignore_errors=True)
        return manifest
    finally:
        lock.release()


def _committed_records(out: Path, kind: Kind) -> tuple[dict, list[dict]]:
    plan = read_json(out / PLAN)
    if plan is None:
        raise UserError(f"{out / PLAN} is unreadable (corrupt JSON): re-run `{kind.command}` with --overwrite")
    n = len(plan["groups"])
    missing = [g for g in range(n) if not group_record_path(out, g).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {n} groups are not finished (first missing: group {missing[0]}); "
                        "re-run the tasks that own them (the same command resumes), then finalize again")
    records = []
    for g in range(n):
        r = read_json(group_record_path(out, g))
        if r is None:
            raise UserError(f"{group_record_path(out, g)} is unreadable: delete it and re-run the task that owns "
                            f"group {g} (the same command redoes it)")
        records.append(r)
    return plan, records
