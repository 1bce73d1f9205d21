"""Joining the process group on the CPU: DeepSpeed's JIT-built shared-memory op and its build lock, and a
rendezvous port that another process holds. Real processes, each in a temporary TORCH_EXTENSIONS_DIR."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cllama_dist.distributed import BUILD_LOCK

from . import launch

pytestmark = pytest.mark.integration

# One write per line: the ranks share the pipe, and a write this small is never split.
JOIN = ("import os\nfrom cllama_dist import distributed as d\nd.init(1)\n"
        "os.write(1, f'joined {d.rank()} {d.world_size()}\\n'.encode())\n")
OP = "deepspeed_shm_comm"


@pytest.fixture(scope="module")
def built_op() -> Path:
    """The op where a run here keeps it (built there once if missing, as any first CPU run does)."""
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory(OP, verbose=False))
    if not (folder / f"{OP}.so").exists():
        code = "from cllama_dist import distributed as d\nd.prepare_cpu_comm_op()\n"
        proc = subprocess.run([sys.executable, "-c", code], env=launch.env(1), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def _extensions(built_op: Path, tmp_path: Path) -> Path:
    """A TORCH_EXTENSIONS_DIR holding a copy of the built op (mtimes kept, so ninja has nothing to do)."""
    root = tmp_path / "ext"
    shutil.copytree(built_op, root / OP, copy_function=shutil.copy2, ignore=shutil.ignore_patterns("lock", BUILD_LOCK))
    return root


def _join(root: Path, nproc: int = 2, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    script = root.parent / "join.py"
    script.write_text(JOIN)
    env = {**launch.env(nproc), "TORCH_EXTENSIONS_DIR": str(root)}
    start = time.monotonic()
    proc = subprocess.run(launch.local.command([], nproc, script=script), env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - start


def _notes(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("note: ")]


def test_a_stale_build_lock_left_by_a_killed_build_is_cleared_in_one_line(built_op, tmp_path):
    """torch's FileBaton waits forever for a lock file that a killed build left; the run goes on within a minute.
    The lock is fresh, as one left a moment ago is: it is its holder that is gone, whatever its age."""
    root = _extensions(built_op, tmp_path)
    baton = root / OP / "lock"
    baton.touch()
    proc, took = _join(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(proc.stdout.split("\n"))[-2:] == ["joined 0 2", "joined 1 2"]
    assert took < 60 and not baton.exists()
    assert _notes(proc) == [f"note: removed {baton}, a stale lock left by a build that was stopped (no process "
                            "holds it)"]


def test_a_build_lock_held_by_a_live_process_is_waited_for_saying_so(built_op, tmp_path):
    root = _extensions(built_op, tmp_path)
    baton, release = root / OP / "lock", tmp_path / "release"
    # Another program building there now, as torch's FileBaton does: the file created and held open, then removed
    # (here when the test says so, or after 90 s).
    holder = subprocess.Popen([sys.executable, "-c", f"""import os, time
fd = os.open({str(baton)!r}, os.O_CREAT | os.O_EXCL)
print('held', flush=True)
end = time.time() + 90
while time.time() < end and not os.path.exists({str(release)!r}):
    time.sleep(0.1)
os.close(fd)
os.remove({str(baton)!r})
"""], stdout=subprocess.PIPE, text=True)
    script = tmp_path / "join.py"
    script.write_text(JOIN)
    try:
        assert holder.stdout.readline().strip() == "held"
        join = subprocess.Popen(launch.local.command([], 1, script=script), stderr=subprocess.PIPE, text=True,
                                stdout=subprocess.PIPE, env={**launch.env(1), "TORCH_EXTENSIONS_DIR": str(root)})
        notes = []
        for line in join.stderr:
            if line.startswith("note: "):
                notes.append(line.strip())
                release.touch()  # the builder finishes once the wait has been said
        join.wait(timeout=120)
        assert join.returncode == 0 and "joined 0 1" in join.stdout.read()
    finally:
        holder.kill()
        holder.wait()
    assert notes == [f"note: waiting for process {holder.pid} that holds the build lock {baton}"]
    assert not baton.exists()


def test_the_first_build_is_announced_once(tmp_path):
    """A missing op is announced in one line before its build; once built, nothing is said. (The compiler's minute
    is left out: the build here only writes the library file, as the real one ends by doing.)"""
    root = tmp_path / "ext"
    code = ("import pathlib, sys\nfrom deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder as B\n"
            "from cllama_dist import distributed as d\n"
            f"B.load = lambda self, verbose=False: pathlib.Path({str(root / OP / (OP + '.so'))!r}).touch()\n"
            "d.prepare_cpu_comm_op()\n")
    env = {**launch.env(1), "TORCH_EXTENSIONS_DIR": str(root)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    assert _notes(runs[0]) == [f"note: building DeepSpeed's shared-memory op {OP} for CPU runs in {root / OP} (first "
                               "run only, about a minute)"]
    assert _notes(runs[1]) == []


def test_a_worker_whose_rendezvous_port_is_taken_names_it_in_one_line(tmp_path):
    """Rank 0 of a job started by a launcher that does not bind the port itself (deepspeed, srun)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {**launch.env(1), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "2",
               "LOCAL_RANK": "0"}
        code = ("import sys\nfrom cllama_dist import distributed as d\nfrom cllama_dist.errors import UserError\n"
                "try:\n    d.init(0.5)\nexcept UserError as exc:\n    sys.exit(f'error: {exc}')\n")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(f"error: rendezvous port {port} is already in use") and \
        "--master-port" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
