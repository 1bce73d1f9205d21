"""Outputs and the filesystem: what every writing stage goes through so that no input is ever lost.

- ``check_not_input``: an output that is, contains or lies inside one of the stage's inputs is refused, with
  or without --overwrite (an export into the base model's folder, shards written over the corpus, a
  tokenizer merged into the model folder).
- ``claim_folder``: an output folder carries a marker (``.cllama-output.json``) naming its kind, written when
  this project creates it. ``--overwrite`` deletes only a folder holding our marker of the same kind; a
  folder without it is never deleted.
- ``Lock``: one writer per output. A lock is a file created with O_CREAT | O_EXCL (atomic on local disks,
  NFS v3+ and Lustre, unlike fcntl/flock, which depend on NFS's lock daemon or Lustre's mount options),
  holding who took it; its holder refreshes its modification time every 30 s. A second writer is refused,
  naming the holder. A lock is taken over, saying so, when its holder is gone: on the same host, its pid no
  longer runs (or runs another program); under Slurm, an earlier attempt of the same job; elsewhere, when
  it has not been refreshed for 10 minutes (CLLAMA_LOCK_STALE_S). What this relies on: atomic exclusive
  create and rename on the shared filesystem, host names that differ between nodes, and clocks that agree
  to within minutes.
- ``os_error``: an OSError as one line naming the path and the cause (disk full says disk full).
- ``write_atomic``: a file written beside its destination and renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping

from . import __version__
from .errors import UserError

MARKER = ".cllama-output.json"
LOCK = ".cllama.lock"
HEARTBEAT_S = 30.0

# What marks a folder as made by an earlier version of this project, before markers existed.
LEGACY_SIGNS = {
    "shards": ("plan.json", "manifest.json"),
    "tokenizer": ("merge_report.json",),
    "run": ("metrics.jsonl", "checkpoints"),
    "adapter": ("cllama_export.json",),
    "merged-model": (),
    "demo": ("summary.json",),
}


# ------------------------------------------------------------------------------ errors


def os_error(exc: OSError, path: str | os.PathLike, action: str = "write") -> UserError:
    """A one-line UserError for an OSError: what failed, where, and why in words."""
    path = getattr(exc, "filename", None) or path
    causes = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.EROFS: "read-only file system",
              errno.ENOENT: "no such file or folder", errno.EISDIR: "is a folder", errno.ENOTDIR: "not a folder",
              errno.EEXIST: "already exists", errno.EIO: "input/output error (failing disk or network filesystem?)"}
    cause = causes.get(exc.errno, exc.strerror or str(exc))
    extra = ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        extra = f" ({free / 1e6:,.1f} MB free there)" if free is not None else ""
    return UserError(f"cannot {action} {path}: {cause}{extra}")


def free_bytes(path: str | os.PathLike) -> int | None:
    p = Path(path)
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


# ------------------------------------------------------------------------------ outputs vs inputs


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def check_not_input(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | Iterable], what: str) -> None:
    """Refuse an ``output`` that is, contains or lies inside one of ``inputs`` (role -> path or paths)."""
    out = _real(output)
    for role, paths in inputs.items():
        if paths is None or paths == "":
            continue
        for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths):
            if not p:
                continue
            src = _real(p)
            if out == src:
                relation = "is"
            elif src.is_relative_to(out):
                relation = "contains"
            elif out.is_relative_to(src) and src.is_dir():
                relation = "lies inside"
            else:
                continue
            raise UserError(f"the {what} output {output} {relation} the {role} {p}: an output never touches an input; "
                            "choose another output path")


# ------------------------------------------------------------------------------ output folders


def _marker(kind: str) -> dict:
    return {"kind": kind, "tool": f"cllama-dist {__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(), "pid": os.getpid()}


def folder_kind(path: Path) -> str | None:
    """The kind recorded in a folder's marker, or the kind its files show it was made as by an older version."""
    marker = path / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text()).get("kind")
        except (json.JSONDecodeError, OSError):
            return None
    for kind, signs in LEGACY_SIGNS.items():
        if signs and any((path / s).exists() for s in signs):
            return kind
    return None


def _only_ours(path: Path) -> bool:
    """An empty folder, or one holding nothing but our lock and marker."""
    return all(p.name in (MARKER, LOCK) for p in path.iterdir())


def claim_folder(path: str | os.PathLike, kind: str, *, overwrite: bool = False, reuse: bool = False) -> Path:
    """Make ``path`` this stage's output folder of ``kind``, or refuse.

    missing: created (with parents, the user's normal permissions) and marked. An empty folder: marked.
    Ours, same kind: kept when ``reuse`` (resume), emptied when ``overwrite``, else refused. Ours, another
    kind, or not ours: refused, even with ``overwrite``: only folders this project made are ever deleted.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"the {kind} output {p} is a file, not a folder; choose a folder path")
    try:
        if not p.exists():
            p.mkdir(parents=True)
        elif not _only_ours(p):
            found = folder_kind(p)
            if found is None:
                raise UserError(f"the {kind} output {p} is a folder that cllama-dist did not create (no {MARKER}) "
                                "and is not empty; it is never deleted: choose another folder or empty it yourself")
            if found != kind:
                raise UserError(f"the {kind} output {p} holds cllama-dist output of another kind ({found}); choose "
                                f"another folder (--overwrite replaces only a {kind} folder)")
            if overwrite:
                for child in p.iterdir():
                    if child.name != LOCK:
                        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            elif not reuse:
                raise UserError(f"the {kind} output {p} exists; pass --overwrite to replace it, or choose another folder")
        if not (p / MARKER).is_file():
            write_atomic(p / MARKER, json.dumps(_marker(kind), indent=1) + "\n")
    except OSError as exc:
        raise os_error(exc, p, "create") from None
    return p


def check_file_output(path: str | os.PathLike, what: str) -> Path:
    """A file output (a report, a model prefix): refuse a folder in its place; create its parent folder."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"the {what} output {p} is a folder, not a file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, p.parent, "create") from None
    if not p.parent.is_dir():
        raise UserError(f"the {what} output {p}: {p.parent} is not a folder")
    return p


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write beside the destination, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(exc, path) from None


# ------------------------------------------------------------------------------ locks


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): tells pid reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    now = _start_time(pid)
    return start is None or now is None or now == start


class Lock:
    """An exclusive lock on an output, held by one process (see the module docstring for the rules)."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None

    def _me(self) -> dict:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "start": _start_time(os.getpid()), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
                "what": self.what}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _stale(self, holder: dict | None) -> str | None:
        """Why the holder is gone, or None when it may still be writing."""
        stale_after = float(os.environ.get("CLLAMA_LOCK_STALE_S", 600))
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was released"
        if holder is None:  # a holder that died while writing the lock file
            return "its lock file is unreadable" if age > 5 else None
        if holder.get("host") == socket.gethostname():
            if not _alive(int(holder.get("pid", -1)), holder.get("start")):
                return f"process {holder.get('pid')} no longer runs"
            return None
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job_id") == job and \
                holder.get("slurm_restart", 0) < int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0):
            return f"it was an earlier attempt of Slurm job {job}"
        if age > stale_after:
            return f"it has not been refreshed for {age / 60:.0f} minutes"
        return None

    def acquire(self) -> "Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                why = self._stale(holder)
                if why is None:
                    h = holder or {}
                    raise UserError(
                        f"{self.path.parent} is being written by another {h.get('what', self.what)}: pid "
                        f"{h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')} (lock {self.path}); "
                        "wait for it to finish or stop it; a lock whose holder is gone is taken over automatically")
                # Take over by rename: of several processes judging the same lock stale, one renames it.
                aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                self.took_over = {**(holder or {}), "why": why}
                continue
            except OSError as exc:
                raise os_error(exc, self.path, "create the lock") from None
            with os.fdopen(fd, "w") as f:
                json.dump(self._me(), f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._heartbeat, name="cllama-lock-heartbeat", daemon=True)
            self._thread.start()
            return self
        raise UserError(f"could not take the lock {self.path}: other processes keep taking it")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        holder = self._read()
        if holder and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def describe_takeover(self) -> str | None:
        if not self.took_over:
            return None
        h = self.took_over
        return (f"note: took over the lock {self.path} of pid {h.get('pid', '?')} on {h.get('host', '?')} "
                f"(since {h.get('since', '?')}): {h['why']}")

    def __enter__(self) -> "Lock":
        self.acquire()
        note = self.describe_takeover()
        if note:
            print(note, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()
