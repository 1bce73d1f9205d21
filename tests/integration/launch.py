"""Launch the trainer as real processes (torchrun or the deepspeed launcher) on the CPU, over gloo.

The commands and environment are the package's own (cllama_dist/launch/local.py, which the demo and the
benchmarks use too); what is here is what only tests need: waiting for a step, killing a whole job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cllama_dist.distributed import free_port  # noqa: F401  (tests call launch.free_port)
from cllama_dist.launch import local
from cllama_dist.trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
TRAIN = local.TRAIN_SCRIPT
FAULTY = Path(__file__).with_name("fault_train.py")


def env(nproc: int = 2) -> dict[str, str]:
    return local.environment(cpu=True, nproc=nproc)


def write_config(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def command(config: Path, nproc: int, launcher: str = "torchrun", script: Path = TRAIN, extra=()) -> list[str]:
    return local.command(["--config", str(config), *extra], nproc, launcher=launcher, script=script)


def run(config: Path, nproc: int = 2, launcher: str = "torchrun", timeout: float = 600, env_extra=None,
        **kw) -> subprocess.CompletedProcess:
    return subprocess.run(command(config, nproc, launcher, **kw), env={**env(nproc), **(env_extra or {})},
                          capture_output=True, text=True, timeout=timeout)


def start(config: Path, nproc: int = 2, log: Path | None = None, **kw) -> subprocess.Popen:
    """Start in its own process group, so that a test can signal or kill every process of the job."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(config, nproc, **kw), env=env(nproc), stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def single(config: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """One trainer process without a launcher (the way a refused input is seen fastest)."""
    return subprocess.run([sys.executable, str(TRAIN), "--config", str(config), *extra], env=env(1),
                          capture_output=True, text=True, timeout=timeout)


def in_process(config: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python cllama_dist/train.py --config CONFIG` (what ``single`` starts) called in this process instead, as
    the only rank of a world of 1: its exit status, stdout and stderr.

    For refused input: every refusal comes before a model is built, and a process of its own adds only its
    start-up (~10 s of importing torch, transformers and DeepSpeed on the 2-core machine) to each check. The
    process boundary itself (exit status 2, one line on stderr, no traceback) is tested once, by
    test_train.py's mismatched shards, which keeps ``single``."""
    return cllama("train", "--config", str(config), *extra)


def cllama(*argv: str) -> subprocess.CompletedProcess:
    """`cllama ARGV` called in this process (cllama_dist.cli.main, with the environment of a one-process job):
    its exit status, stdout and stderr. The environment is restored afterwards: the CLI and the trainer's
    set-up export settings (RANK, MASTER_PORT, TQDM_DISABLE, ...) that must not reach the next test."""
    import contextlib
    import io

    from cllama_dist.cli import main

    saved = dict(os.environ)
    env = local.single_process_env(cpu=True)
    env.pop("CUDA_VISIBLE_DEVICES", None)  # this process's CUDA must stay as it is; DS_ACCELERATOR=cpu suffices
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["cllama", *argv], code, out.getvalue(), err.getvalue())


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
    return read_metrics(run_dir, kind)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir, "train")}
