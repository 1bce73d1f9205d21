"""Fixtures for the integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from . import launch
from .runs import EARLIER_ATTEMPT, SAME_CURVE, configure
from .slurm_env import require_slurm

TF4_BUILD = Path(__file__).resolve().parents[1] / "compat" / "run_tf4.sh"
_background: list[subprocess.Popen] = []


def pytest_collection_finish(session):
    """When test_tokenizer_compat.py's transformers-4 check is selected, its environment (a virtual environment from
    PyPI, tests/compat/run_tf4.sh; 20-40 s on a machine that has none yet) is built in the background from the
    start, its download overlapping the other tests; the check waits for it (the script's lock) if it is not done."""
    if not session.config.option.collectonly and any(item.name == "test_transformers_4" for item in session.items):
        _background.append(subprocess.Popen(["bash", str(TF4_BUILD), "--build-only"], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                            start_new_session=True))


def pytest_sessionfinish(session):
    for proc in _background:
        if proc.poll() is None:  # the session ended early: an unfinished environment is rebuilt next time
            os.killpg(proc.pid, signal.SIGTERM)  # the script and its pip
            proc.wait()


@pytest.fixture(scope="session")
def setup(tiny_model_dir, tiny_merged, tiny_shards, tmp_path_factory):
    """(base model folder, merged tokenizer, shards, a folder for runs), shared by every integration module."""
    return tiny_model_dir, tiny_merged, tiny_shards, tmp_path_factory.mktemp("train")


@pytest.fixture(scope="session")
def reference(setup):
    """An uninterrupted 2-process run: the losses every other run is compared with."""
    cfg, out = configure(setup, "reference")
    proc = launch.run(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, launch.losses(out), proc


@pytest.fixture(scope="session")
def same_curve(setup):
    """name -> (run folder, losses, process output) of runs.SAME_CURVE's run NAME, launched on first use only."""
    done: dict[str, tuple] = {}

    def get(name: str):
        if name not in done:
            spec = SAME_CURVE[name]
            cfg, out = configure(setup, name, **spec.over)
            out.mkdir(parents=True)
            (out / "metrics.jsonl").write_text(EARLIER_ATTEMPT)
            if spec.start == "srun":
                env = {**launch.env(), "SLURM_NTASKS": "2", "SLURM_JOB_ID": str(launch.free_port()),
                       "SLURM_JOB_NODELIST": "127.0.0.1"}
                procs = [subprocess.Popen([sys.executable, str(launch.TRAIN), "--config", str(cfg)],
                                          env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
                outputs = [p.communicate(timeout=600)[0] for p in procs]
                assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
                proc = subprocess.CompletedProcess(procs[0].args, 0, outputs[0], "")
            else:
                proc = launch.run(cfg)
                assert proc.returncode == 0, proc.stderr[-3000:]
            done[name] = out, launch.losses(out), proc
        return done[name]

    return get


@pytest.fixture
def slurm_cluster(monkeypatch) -> dict[str, str]:
    """A running two-node Slurm cluster (tests/slurm/cluster.sh), or skip.

    Returns the environment for Slurm commands (pass it as `env=` to subprocess). SLURM_CONF is
    also set in this process for the test's duration, so in-process callers such as submitit,
    which run sbatch with the inherited environment, reach the same cluster.
    """
    env = require_slurm()
    if "SLURM_CONF" in env:
        monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    else:
        monkeypatch.delenv("SLURM_CONF", raising=False)
    return env
