"""The submitit launcher: training and preprocessing jobs from Python or `cllama submit`.

    cllama submit train --config configs/llama-7b.yaml --nodes 2 --gpus-per-node 8 --partition a100 --time 24:00:00
    cllama submit train --config run.yaml --local --gpus-per-node 2          # a workstation, no Slurm
    cllama submit preprocess --tasks 16 --cpus 32 -- --corpus data/ --tokenizer merged/ --output shards/
    cllama submit preprocess-sft --tasks 4 -- --inputs alpaca_zh.jsonl --tokenizer merged/ --output sft/

    from cllama_dist.config import load
    from cllama_dist.launch.config import SubmitConfig
    from cllama_dist.launch.submit import submit_train
    from cllama_dist.trainer.config import TrainConfig
    job = submit_train(load(TrainConfig, "run.yaml"), SubmitConfig(nodes=2, partition="a100"))

The job carries the stage's config object itself (pickled by submitit), checked before submission, and
calls the stage function (cllama_dist/stages.py) in each task.

Preemption and time limits: submitit runs its ``checkpoint()`` on global rank 0 alone, inside a signal
handler, where a ZeRO-3 save (a collective) would deadlock. So while the trainer runs, its own handlers
replace submitit's on every rank: the signal (USR2, sent to every task) only sets a flag, all ranks save
together at the next step boundary, and the trainer returns. Only then, outside any collective, rank 0
hands the signal back to submitit, whose handler calls ``checkpoint()`` and requeues the job; the
requeued job resumes with ``checkpoint.resume: auto``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

import submitit

from .. import stages
from ..data.config import FinalizeConfig, PreprocessConfig, SFTPreprocessConfig
from ..errors import UserError
from ..trainer.config import TrainConfig
from .config import SubmitConfig, minutes


class TrainJob(submitit.helpers.Checkpointable):
    """One task of a training job: rank set-up from submitit, then the trainer in this process."""

    def __init__(self, cfg: TrainConfig, device: str = "gpu"):
        self.cfg = cfg
        self.device = device

    def __call__(self) -> int:
        from .. import distributed
        from ..trainer.loop import EXIT_STOPPED

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if os.environ.get("SLURM_JOB_NODELIST"):
            # submitit takes the first node's *name*, which need not resolve; Slurm's NodeAddr does.
            os.environ["MASTER_ADDR"] = distributed.first_node_addr(os.environ["SLURM_JOB_NODELIST"])
        if self.device == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"
        cfg = dataclasses.replace(self.cfg, checkpoint=dataclasses.replace(self.cfg.checkpoint, resume="auto"))
        try:
            code = stages.train(cfg)
        except UserError as exc:  # refused input: one line in the job's log, status 2 as the result
            print(f"cllama train: error: {exc}", file=sys.stderr, flush=True)
            return 2
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
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg, self.device))


def _executor(folder: str, local: bool) -> submitit.AutoExecutor:
    Path(folder).mkdir(parents=True, exist_ok=True)
    return submitit.AutoExecutor(folder=folder, cluster="local" if local else None, slurm_max_num_timeout=100)


def submit_train(cfg: TrainConfig, job: SubmitConfig, signal_delay_s: int = 300,
                 slurm_extra: dict | None = None) -> submitit.Job:
    """Submit the trainer: ``procs_per_node`` tasks per node (default: one per GPU; one on CPU)."""
    procs = job.procs_per_node or (job.gpus_per_node if job.device == "gpu" else 1)
    ex = _executor(job.folder, job.local)
    params = dict(name="cllama-train", nodes=job.nodes, tasks_per_node=procs, timeout_min=minutes(job.time),
                  cpus_per_task=job.cpus)
    if job.device == "gpu":
        params["gpus_per_node"] = job.gpus_per_node
    if not job.local:
        params.update(slurm_signal_delay_s=signal_delay_s,
                      slurm_additional_parameters={"requeue": True, **(slurm_extra or {})})
        if job.partition:
            params["slurm_partition"] = job.partition
    ex.update_parameters(**params)
    return ex.submit(TrainJob(cfg, job.device))


def _preprocess_task(cfg: PreprocessConfig | SFTPreprocessConfig, task_id: int, num_tasks: int) -> str:
    run = stages.preprocess_sft_task if isinstance(cfg, SFTPreprocessConfig) else stages.preprocess_task
    run(dataclasses.replace(cfg, num_tasks=num_tasks, task_id=task_id))
    return f"task {task_id} done"


def _preprocess_finalize(cfg: FinalizeConfig, sft: bool = False) -> str:
    (stages.preprocess_sft_finalize if sft else stages.preprocess_finalize)(cfg)
    return "finalized"


def submit_preprocess(cfg: PreprocessConfig | SFTPreprocessConfig, job: SubmitConfig):
    """An array of ``job.tasks`` preprocessing tasks (map_array), then finalize as a dependent job. ``cfg`` is a
    corpus (PreprocessConfig) or instruction data (SFTPreprocessConfig)."""
    tasks = job.tasks
    sft = isinstance(cfg, SFTPreprocessConfig)
    name = "preprocess-sft" if sft else "preprocess"
    try:
        (stages.preprocess_sft_prepare if sft else stages.preprocess_prepare)(
            dataclasses.replace(cfg, num_tasks=tasks, task_id=0))
    except UserError as exc:
        raise UserError(f"{name} prepare: {exc}") from None
    ex = _executor(job.folder, job.local)
    params = dict(name=f"cllama-{name}", nodes=1, tasks_per_node=1, cpus_per_task=job.cpus,
                  timeout_min=minutes(job.time))
    if job.partition and not job.local:
        params["slurm_partition"] = job.partition
    ex.update_parameters(**params)
    array = ex.map_array(_preprocess_task, [cfg] * tasks, list(range(tasks)), [tasks] * tasks)
    if job.local:
        for j in array:
            j.result()
        ex.update_parameters(name=f"cllama-{name}-finalize", cpus_per_task=1)
    else:
        ex.update_parameters(name=f"cllama-{name}-finalize", cpus_per_task=1,
                             slurm_additional_parameters={"dependency": f"afterok:{array[0].job_id.split('_')[0]}"})
    final = ex.submit(_preprocess_finalize, FinalizeConfig(output=cfg.output), sft)
    return array, final
