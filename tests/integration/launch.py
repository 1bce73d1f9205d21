"""Launch the trainer as real processes (torchrun or the deepspeed launcher) on the CPU, over gloo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cllama_dist.distributed import free_port  # noqa: F401  (tests call launch.free_port)

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "cllama_dist" / "train.py"




def env() -> dict[str, str]:
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def command(config: Path, nproc: int, launcher: str = "torchrun", script: Path = TRAIN, extra=()) -> list[str]:
    port = str(free_port())
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", port]
    elif launcher == "deepspeed":
        head = ["deepspeed", "--num_gpus", str(nproc), "--master_port", port]
    else:
        raise ValueError(launcher)
    return [*head, str(script), "--config", str(config), *extra]


def run(config: Path, nproc: int = 2, launcher: str = "torchrun", timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command(config, nproc, launcher, **kw), env=env(), capture_output=True, text=True,
                          timeout=timeout)


def start(config: Path, nproc: int = 2, log: Path | None = None, **kw) -> subprocess.Popen:
    """Start in its own process group, so that a test can signal or kill every process of the job."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(config, nproc, **kw), env=env(), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def workers(proc: subprocess.Popen) -> list[int]:
    """Pids of the launcher's worker processes (its children running train.py)."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Block until metrics.jsonl reports a train step >= step; returns the step seen."""
    end = time.time() + timeout
    while time.time() < end:
        recs = metrics(run_dir, "train")
        if recs and recs[-1]["step"] >= step:
            return recs[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its workers at once, as a node failure would (torchrun puts its workers
    in sessions of their own, so killing its process group alone leaves them running)."""
    pids = workers(proc)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for pid in pids:  # wait until the workers are gone: nothing may write after this
        while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    from cllama_dist.trainer import read_metrics

    return read_metrics(run_dir, kind)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir, "train")}
