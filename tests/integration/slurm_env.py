"""Find the local Slurm test cluster (tests/slurm/cluster.sh), or skip.

The cluster keeps its slurm.conf in its state directory, not in /etc/slurm, so Slurm's commands
(sbatch, srun, squeue, and submitit, which calls them) need SLURM_CONF. `require_slurm()` looks for
it in this order: $SLURM_CONF, $CLLAMA_SLURM_DIR/slurm.conf, /tmp/cllama-slurm/slurm.conf (the
script's default), then Slurm's own default (no SLURM_CONF at all, e.g. a real cluster's node).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

NODES = 2
_absent = False  # set once no cluster was found
DEFAULT_STATE_DIR = "/tmp/cllama-slurm"
SKIP_MESSAGE = (
    "Slurm test cluster not running: run `bash tests/slurm/cluster.sh install && "
    "bash tests/slurm/cluster.sh start` (as root) to enable these tests"
)


def _candidate_confs() -> list[str | None]:
    """SLURM_CONF values to try, best first; None means Slurm's compiled-in default."""
    out: list[str | None] = []
    if os.environ.get("SLURM_CONF"):
        out.append(os.environ["SLURM_CONF"])
    state = os.environ.get("CLLAMA_SLURM_DIR") or DEFAULT_STATE_DIR
    conf = str(Path(state, "slurm.conf"))
    if Path(conf).is_file() and conf not in out:
        out.append(conf)
    out.append(None)
    return out


def _controller_dead(conf: str | None) -> bool:
    """True when `conf` belongs to a cluster.sh state dir whose slurmctld is not running: saves
    sinfo's ~9 s of connection retries on a machine where the cluster was stopped."""
    if conf is None:
        return False
    pid_file = Path(conf).parent / "slurmctld.pid"
    if not Path(conf).parent.joinpath("munge").is_dir():
        return False  # not a cluster.sh state dir: let sinfo tell
    try:
        pid = int(pid_file.read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip() != "slurmctld"
    except (OSError, ValueError):
        return True


def _node_states(env: dict[str, str]) -> list[str] | None:
    """Compact state of each node ("idle", "mix", "idle*", ...), or None if sinfo gets no answer."""
    try:
        r = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    # One line per node and partition; a node in two partitions counts once.
    states = dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)
    return list(states.values())


def slurm_env(wait_s: float = 30.0) -> dict[str, str] | None:
    """The environment (os.environ plus SLURM_CONF where needed) under which `sinfo` shows
    NODES idle nodes, or None.

    A cluster that answers but is still busy (nodes "mix"/"alloc"/"comp" while an earlier test's
    job winds down) is waited on for up to `wait_s` seconds; one that does not answer is not.
    """
    global _absent
    if _absent or shutil.which("sinfo") is None:
        return None
    answered = False
    for conf in _candidate_confs():
        if _controller_dead(conf):
            continue
        env = dict(os.environ)
        if conf is None:
            env.pop("SLURM_CONF", None)
        else:
            env["SLURM_CONF"] = conf
        deadline = time.monotonic() + wait_s
        while True:
            states = _node_states(env)
            if states is None:
                break  # no controller behind this config: try the next one
            answered = True
            if sum(s == "idle" for s in states) >= NODES:
                return env
            if time.monotonic() >= deadline:
                break
            time.sleep(1.0)
    # No controller at all: remember it, so that every later Slurm test in this process skips at
    # once instead of asking again. (A busy cluster is asked again next time.)
    _absent = not answered
    return None


def require_slurm(wait_s: float = 30.0) -> dict[str, str]:
    """Return the environment for Slurm commands (see `slurm_env`), or skip the calling test."""
    env = slurm_env(wait_s)
    if env is None:
        pytest.skip(SKIP_MESSAGE)
    return env
