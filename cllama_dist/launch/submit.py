"""The submitit launcher: training and preprocessing jobs from Python or `cllama submit`.

    cllama submit train --config configs/llama-7b.yaml --nodes 2 --gpus-per-node 8 --partition a100 --time 24:00:00
    cllama submit train --config run.yaml --local --gpus-per-node 2          # a workstation, no Slurm
    cllama submit preprocess --tasks 16 --cpus 32 -- --corpus data/ --tokenizer merged/ --output shards/

    from cllama_dist.launch.submit import submit_train
    job = submit_train(["--config", "run.yaml"], nodes=2, gpus_per_node=8, partition="a100", time="24:00:00")

Preemption and time limits (hazard H7): submitit runs its ``checkpoint()`` on global rank 0 alone, inside
a signal handler, where a ZeRO-3 save (a collective) would deadlock. So while the trainer runs, its own
handlers replace submitit's on every rank: the signal (USR2, sent to every task) only sets a flag, all
ranks save together at the next step boundary, and the trainer returns. Only then, outside any
collective, rank 0 hands the signal back to submitit, whose handler calls ``checkpoint()`` and
requeues the job; the requeued job resumes with ``--resume auto``.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Sequence

import submitit

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


class TrainJob(submitit.helpers.Checkpointable):
    """One task of a training job: rank set-up from submitit, then the trainer in this process."""

    def __init__(self, argv: Sequence[str], device: str = "gpu"):
        self.argv = list(argv)
        self.device = device

    def __call__(self) -> int:
        from .. import distributed
        from ..train import main
        from ..trainer import EXIT_STOPPED

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if os.environ.get("SLURM_JOB_NODELIST"):
            # submitit takes the first node's *name*, which need not resolve (hazard H8).
            os.environ["MASTER_ADDR"] = distributed.first_node_addr(os.environ["SLURM_JOB_NODELIST"])
        if self.device == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
        code = main([*self.argv, "--resume", "auto"])
        if code == EXIT_STOPPED:
            if env.rank == 0:
                # The checkpoint is written; now let submitit's own handler requeue the job.
                signal.raise_signal(submitit.JobEnvironment._usr_sig())
            return code
        if code != 0:
            raise RuntimeError(f"the trainer exited with status {code} (rank {env.rank}); see the job's log")
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # Called by submitit (rank 0) after the trainer has saved: resubmit the same job; it resumes.
        return submitit.helpers.DelayedSubmission(TrainJob(self.argv, self.device))


def _executor(folder: str, local: bool) -> submitit.AutoExecutor:
    Path(folder).mkdir(parents=True, exist_ok=True)
    return submitit.AutoExecutor(folder=folder, cluster="local" if local else None, slurm_max_num_timeout=100)


def submit_train(argv: Sequence[str], nodes: int = 1, gpus_per_node: int = 8, partition: str | None = None,
                 time: str | int = "24:00:00", cpus_per_task: int = 8, device: str = "gpu",
                 procs_per_node: int | None = None, folder: str = "runs/submitit", local: bool = False,
                 signal_delay_s: int = 300, slurm_extra: dict | None = None) -> submitit.Job:
    """Submit the trainer: ``procs_per_node`` tasks per node (default: one per GPU; one on CPU)."""
    procs = procs_per_node or (gpus_per_node if device == "gpu" else 1)
    ex = _executor(folder, local)
    params = dict(name="cllama-train", nodes=nodes, tasks_per_node=procs, timeout_min=minutes(time),
                  cpus_per_task=cpus_per_task)
    if device == "gpu":
        params["gpus_per_node"] = gpus_per_node
    if not local:
        params.update(slurm_signal_delay_s=signal_delay_s, slurm_additional_parameters={"requeue": True, **(slurm_extra or {})})
        if partition:
            params["slurm_partition"] = partition
    ex.update_parameters(**params)
    return ex.submit(TrainJob(argv, device))


def _preprocess_task(argv: list[str], task_id: int, num_tasks: int) -> str:
    from ..cli import main

    code = main(["preprocess", *argv, "--num-tasks", str(num_tasks), "--task-id", str(task_id)])
    if code:
        raise RuntimeError(f"preprocess task {task_id} failed with status {code}")
    return f"task {task_id} done"


def _preprocess_finalize(argv: list[str]) -> str:
    from ..cli import main

    code = main(["preprocess", "finalize", *argv])
    if code:
        raise RuntimeError(f"preprocess finalize failed with status {code}")
    return "finalized"


def submit_preprocess(argv: Sequence[str], tasks: int, cpus: int = 16, partition: str | None = None,
                      time: str | int = "12:00:00", folder: str = "runs/submitit", local: bool = False):
    """An array of ``tasks`` preprocessing tasks (map_array), then finalize as a dependent job."""
    from ..cli import main

    argv = list(argv)
    if main(["preprocess", "prepare", *argv, "--num-tasks", str(tasks), "--task-id", "0"]):
        raise UserError("preprocess prepare failed (see the message above)")
    ex = _executor(folder, local)
    params = dict(name="cllama-preprocess", nodes=1, tasks_per_node=1, cpus_per_task=cpus, timeout_min=minutes(time))
    if partition and not local:
        params["slurm_partition"] = partition
    ex.update_parameters(**params)
    array = ex.map_array(_preprocess_task, [argv] * tasks, list(range(tasks)), [tasks] * tasks)
    if local:
        for job in array:
            job.result()
        ex.update_parameters(name="cllama-preprocess-finalize", cpus_per_task=1)
    else:
        ex.update_parameters(name="cllama-preprocess-finalize", cpus_per_task=1,
                             slurm_additional_parameters={"dependency": f"afterok:{array[0].job_id.split('_')[0]}"})
    final = ex.submit(_preprocess_finalize, argv)
    return array, final
