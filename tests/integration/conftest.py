"""Fixtures for the integration tests."""

from __future__ import annotations

import pytest

from . import launch
from .runs import configure
from .slurm_env import require_slurm


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
