"""Fixtures for the integration tests."""

from __future__ import annotations

import pytest

from .slurm_env import require_slurm


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
