"""Settings of ``cllama submit``: where and how big the job is (the stage's own settings come separately)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..config import PathStr, Section, check, option
from ..errors import UserError


def minutes(time: str | int) -> int:
    """A Slurm time limit in whole minutes (seconds round up). Slurm's forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    if isinstance(time, int):
        return time
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", time.strip())
    if not m:
        raise UserError(f"cannot read the time limit {time!r}; use M, M:S, H:M:S or D-H:M:S")
    days, a, b, c = m.groups()
    fields = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:
        h, mi, sec = (fields + [0, 0])[:3]  # D-H[:M[:S]]
    elif len(fields) == 3:
        h, mi, sec = fields                 # H:M:S
    elif len(fields) == 2:
        h, mi, sec = 0, *fields             # M:S
    else:
        h, mi, sec = 0, fields[0], 0        # M
    return int(days or 0) * 1440 + h * 60 + mi + (1 if sec else 0)


@dataclass
class SubmitConfig(Section):
    """A submitit job: Slurm, or this machine with --local."""

    nodes: int = option(1, "Nodes (train).")
    gpus_per_node: int = option(8, "GPUs per node; one process each.")
    procs_per_node: int = option(0, "Processes per node (0: one per GPU, or 1 on CPU).")
    device: Literal["gpu", "cpu"] = option("gpu", "cpu: gloo, no GPUs requested.")
    tasks: int = option(1, "Array tasks (preprocess).")
    cpus: int = option(8, "CPU cores per task.")
    partition: str = option("", "Slurm partition (default: the cluster's default).")
    time: str = option("24:00:00", "Time limit of one attempt (minutes, HH:MM:SS, D-HH:MM:SS).")
    folder: PathStr = option("runs/submitit", "submitit's folder: pickles and logs.")
    local: bool = option(False, "Run on this machine (submitit's local executor).")
    wait: bool = option(False, "Wait for the jobs and print their results.")

    def validate(self) -> None:
        for name in ("nodes", "tasks", "cpus"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, got {getattr(self, name)}")
        check(self.gpus_per_node >= 0 and self.procs_per_node >= 0, "gpus_per_node",
              "gpus_per_node and procs_per_node must be >= 0")
        minutes(self.time)  # refuse an unreadable time limit now, not at submission
