"""The output folder: its layout, its JSON records, its locks, and the checks made before anything is written.

Layout: ``plan.json`` (the plan, written once, the same for every task), ``.groups/group-NNNNNN.json`` (a group's
record, written last and atomically: the commit point of its shards ``<split>-NNNNNN.arrow``), ``.tmp/`` (the spill
files of chunks being encoded), ``manifest.json`` (finalize's).

Writers (docs/hazards.md#h15): one per output. Checking or creating the plan happens under the folder's lock (held
for moments; the tasks of an array take it in turn); each task then holds a lock of its own for its whole run, and
is refused while a live task owning one of its groups holds one; finalize holds its own and refuses while any
task's is live. Each refusal names the holder. Only a folder this project made is ever replaced (``--overwrite``,
``files.claim_folder``), and never while another writer holds a lock in it.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path

from ... import files
from ...errors import UserError
from ...files import Lock
from .kind import Kind, RunConfig
from .plan import task_groups

PLAN = "plan.json"
GROUPS = ".groups"
SPILL = ".tmp"
# Locks (files.Lock): the folder's lock guards the plan (held for moments: checking, creating or replacing
# plan.json); a task holds its own for its whole run; finalize holds its own and refuses while a task's is live.
PLAN_LOCK = files.LOCK
TASK_LOCK = ".task-{task:06d}-of-{num:06d}.lock"
TASK_LOCK_RE = re.compile(r"\.task-(\d+)-of-(\d+)\.lock")
FINALIZE_LOCK = ".finalize.lock"
PLAN_LOCK_WAIT_S = 120.0  # the tasks of an array start together and take the plan lock in turn
# The command that makes each kind of output folder, to name in the refusal to finalize another kind's folder.
COMMANDS = {"shards": "cllama preprocess", "sft-shards": "cllama preprocess-sft"}


def write_json(path: Path, obj: dict) -> None:
    files.write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON file at ``path``; None if it is missing or corrupt."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None
    except OSError as exc:
        raise files.os_error(exc, path, "read") from None


def group_record_path(out: Path, g: int) -> Path:
    return out / GROUPS / f"group-{g:06d}.json"


def shard_path(out: Path, split: str, g: int) -> Path:
    """Group ``g``'s shard of ``split``."""
    return out / f"{split}-{g:06d}.arrow"


def spill_path(out: Path, c: int) -> Path:
    """The stem of chunk ``c``'s spill files (the kind adds a suffix per file)."""
    return out / SPILL / f"chunk-{c:07d}"


def take(lock: Lock) -> Lock:
    """``lock`` acquired (a refusal names its holder), with a note when it took over a dead holder's."""
    try:
        lock.acquire()
    except OSError as exc:
        raise files.os_error(exc, lock.path, "create") from None
    note = lock.describe_takeover()
    if note:
        print(note, file=sys.stderr, flush=True)
    return lock


def take_plan_lock(out: Path, kind: Kind) -> Lock:
    """The folder's lock, waited for: the tasks of an array start together and each holds it for moments."""
    if out.exists() and not out.is_dir():
        raise UserError(f"the {kind.folder_kind} output {out} is a file, not a folder; choose a folder path")
    lock = Lock(out / PLAN_LOCK, f"{kind.label} (checking the plan)")
    deadline = time.monotonic() + PLAN_LOCK_WAIT_S
    vanished = 0
    while True:
        try:
            return take(lock)
        except UserError:
            if not lock.path.exists():  # not held: the error was another (or the holder just left)
                vanished += 1
                if vanished > 3:
                    raise
                continue
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05 + 0.2 * random.random())


def probe(path: Path, what: str) -> None:
    """Raise, naming the holder, if the lock at ``path`` is live; clear it if its holder is gone."""
    take(Lock(path, what)).release()


def live_locks_refuse(out: Path, action: str, kind: Kind, finalize_too: bool = True) -> None:
    """Refuse ``action`` while a task (or finalize) holds its lock in ``out``. Called under the plan lock."""
    names = sorted(p.name for p in out.glob(".task-*.lock") if TASK_LOCK_RE.fullmatch(p.name))
    if finalize_too and (out / FINALIZE_LOCK).exists():
        names.append(FINALIZE_LOCK)
    for name in names:
        try:
            probe(out / name, kind.label)
        except UserError as exc:
            raise UserError(f"cannot {action} {out}: {exc}") from None


def take_task_lock(out: Path, plan: dict, cfg: RunConfig, kind: Kind) -> Lock:
    """This task's lock, after making sure no live task of any split of the work owns one of its groups (a
    task of 3 and the single task of a plain run overlap). Called under the plan lock, so no task can start in
    between."""
    n = len(plan["groups"])
    mine = task_groups(n, cfg.num_tasks, cfg.task_id)
    name = TASK_LOCK.format(task=cfg.task_id, num=cfg.num_tasks)
    for p in sorted(out.glob(".task-*.lock")):
        m = TASK_LOCK_RE.fullmatch(p.name)
        if not m or p.name == name:
            continue
        theirs = task_groups(n, int(m[2]), int(m[1])) if int(m[1]) < int(m[2]) else range(0)
        if mine and theirs and mine.start < theirs.stop and theirs.start < mine.stop:
            probe(p, kind.label)
    return take(Lock(out / name, f"{kind.label} task {cfg.task_id} of {cfg.num_tasks}"))


def open_output(cfg: RunConfig, plan: dict, kind: Kind, *, hold_task: bool) -> Lock | None:
    """Create the output folder with its plan, or check that an existing one has the same plan; then (with
    ``hold_task``) take this task's lock. Only a folder this project made is ever replaced (--overwrite), and
    never while another writer holds a lock in it.

    ``cfg``: the kind's config (resolved: ``plan.resolve_task``)."""
    out = Path(cfg.output)
    held = take_plan_lock(out, kind)
    try:
        existing = out / PLAN
        old = read_json(existing) if existing.is_file() else None
        if existing.is_file() and old == plan:
            files.claim_folder(out, kind.folder_kind, reuse=True)
        else:
            if existing.is_file() and not cfg.overwrite:
                raise UserError(_plan_refusal(out, old, plan))
            if cfg.overwrite:
                live_locks_refuse(out, "replace", kind)
            files.claim_folder(out, kind.folder_kind, overwrite=cfg.overwrite)
            write_json(existing, plan)
        try:
            (out / GROUPS).mkdir(exist_ok=True)
            (out / SPILL).mkdir(exist_ok=True)
        except OSError as exc:
            raise files.os_error(exc, out, "create") from None
        return take_task_lock(out, plan, cfg, kind) if hold_task else None
    finally:
        held.release()


def _plan_refusal(out: Path, old: dict | None, new: dict) -> str:
    if old is None:
        return f"{out / PLAN} is unreadable (corrupt JSON); --overwrite replaces the folder"
    changes = _input_changes(old.get("inputs", []), new["inputs"])
    settings = _settings_diff(old, new)
    if changes and not settings:
        return (f"output folder {out} was made from other inputs: {'; '.join(changes)}; --overwrite redoes it "
                "from the files as they are now (or choose another folder)")
    return (f"output folder {out} was made with other settings: {'; '.join(settings + changes) or 'the plan differs'}; "
            "use another folder, or --overwrite to delete it")


def _input_changes(old: list[dict], new: list[dict]) -> list[str]:
    """Each input that differs between two plans, named, with what changed."""
    def key(i: dict) -> str:
        return i.get("real") or i["path"]

    a, b = {key(i): i for i in old}, {key(i): i for i in new}
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x is None:
            out.append(f"{y['path']} is new")
        elif y is None:
            out.append(f"{x['path']} is no longer an input")
        elif x != y:
            if "sample" not in x:
                out.append(f"{y['path']} was recorded by an earlier version (no modification time or content sample)")
                continue
            what = []
            if x["size"] != y["size"]:
                what.append(f"size {x['size']:,} -> {y['size']:,} bytes")
            if x["mtime_ns"] != y["mtime_ns"]:
                what.append(f"modified {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(x['mtime_ns'] / 1e9))} "
                            f"-> {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(y['mtime_ns'] / 1e9))}")
            if x["sample"] != y["sample"]:
                what.append("its content differs")
            if x["path"] != y["path"]:
                what.append(f"now named {y['path']}")
            out.append(f"{y['path']} changed ({', '.join(what) or 'format'})")
    if [key(i) for i in old] != [key(i) for i in new] and not out:
        out.append("the inputs are in another order")
    return out


def _settings_diff(old: dict, new: dict) -> list[str]:
    a, b = old.get("settings", {}), new["settings"]
    diffs = []
    if a.get("tokenizer", {}).get("sha256") != b["tokenizer"]["sha256"]:
        ta = a.get("tokenizer", {})
        diffs.append(f"tokenizer sha256 {str(ta.get('sha256'))[:16]}... (vocab {ta.get('vocab_size', 0):,}) there, "
                     f"{b['tokenizer']['sha256'][:16]}... (vocab {b['tokenizer']['vocab_size']:,}) now")
    for k in sorted(set(a) | set(b)):
        if k != "tokenizer" and a.get(k) != b.get(k):
            diffs.append(f"{k} {a.get(k)!r} there, {b.get(k)!r} now")
    if old.get("chunks") != new["chunks"] or old.get("groups") != new["groups"]:
        if not diffs and not _input_changes(old.get("inputs", []), new["inputs"]):
            diffs.append("the chunks or groups differ (a plan of another version?)")
    return diffs
