"""The launchers on a real two-node Slurm cluster (tests/slurm/cluster.sh): sbatch slurm/pretrain.sh, the
submitit launcher, preemption with requeue, and the preprocessing array. CPU, gloo, one process per node.

Every run is compared with the same config under torchrun with 2 processes on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from . import launch
from .runs import base_config

pytestmark = pytest.mark.slurm

REPO = launch.REPO
STEPS = 8


def job_state(job: str, env: dict) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=env).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_job(job: str, env: dict, timeout: float = 600) -> dict[str, str]:
    end = time.time() + timeout
    while time.time() < end:
        state = job_state(job, env)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} did not finish in {timeout}s: {job_state(job, env)}")


def wait_for_step(run: Path, step: int, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        recs = launch.metrics(run, "train")
        if recs and recs[-1]["step"] >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"{run} never reached step {step}")


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tiny_merged, tiny_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    return tiny_model_dir, tiny_merged, tiny_shards, root


def configure(setup, name: str, **over) -> tuple[Path, Path]:
    model, tok, shards, root = setup
    out = root / name
    cfg = base_config(model, tok, shards, out, **{"optim.max_steps": STEPS, "validation.every": 4, **over})
    return launch.write_config(root / f"{name}.yaml", **cfg), out


@pytest.fixture(scope="module")
def reference(setup):
    cfg, out = configure(setup, "torchrun")
    proc = launch.run(cfg, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return launch.losses(out)


def sbatch(args: list[str], env: dict, cwd: Path) -> str:
    job_env = {**env, "CLLAMA_DEVICE": "cpu", "SBATCH_GPUS_PER_NODE": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["sbatch", "--parsable", "-N", "2", "--cpus-per-task", "1", *args],
                          capture_output=True, text=True, env=job_env, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def test_sbatch_pretrain_trains_across_two_nodes(slurm_cluster, setup, reference):
    cfg, out = configure(setup, "sbatch")
    root = setup[3]
    job = sbatch([str(REPO / "slurm" / "pretrain.sh"), str(cfg)], slurm_cluster, root)
    state = wait_job(job, slurm_cluster)
    log = (root / f"cllama-pretrain-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", log[-3000:]
    assert "2 nodes x 1 processes, rendezvous 127.0.0.1:" in log
    assert "2 processes x micro-batch 2 x accumulation 2" in log
    assert launch.losses(out) == reference
    assert (out / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").is_file()


def test_signal_mid_run_saves_requeues_and_resumes_without_replay(slurm_cluster, setup, reference):
    cfg, out = configure(setup, "preempted")
    root = setup[3]
    job = sbatch([str(REPO / "slurm" / "pretrain.sh"), str(cfg)], slurm_cluster, root)
    wait_for_step(out, 2)
    # What --signal=B:USR1@300 delivers before the time limit.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=slurm_cluster)
    state = wait_job(job, slurm_cluster)
    log = (root / f"cllama-pretrain-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-3000:]
    assert "requeueing job" in log and "attempt 1:" in log
    signalled = [json.loads((p / "trainer_state.json").read_text()) for p in (out / "checkpoints").glob("step-*")
                 if p.is_dir() and not p.name.endswith(".universal")]
    stops = [s["step"] for s in signalled if s["reason"] == "signal"]
    assert len(stops) == 1 and stops[0] < STEPS
    assert f"resumed from {out}/checkpoints/step-{stops[0]:08d} at step {stops[0]}" in log
    steps = [r["step"] for r in launch.metrics(out, "train")]
    assert steps == list(range(1, STEPS + 1))  # each step trained and logged once: nothing replayed
    assert launch.losses(out) == reference


def test_submitit_launcher_over_two_nodes_with_preemption(slurm_cluster, setup, reference):
    from cllama_dist.config import load
    from cllama_dist.launch.config import SubmitConfig
    from cllama_dist.launch.submit import submit_train
    from cllama_dist.trainer.config import TrainConfig

    cfg, out = configure(setup, "submitit")
    job = submit_train(load(TrainConfig, cfg), SubmitConfig(nodes=2, device="cpu", cpus=1, time="10",
                                                            folder=str(setup[3] / "submitit-jobs")))
    wait_for_step(out, 2)
    # submitit's preemption/timeout signal, to every task.
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, env=slurm_cluster)
    assert job.results() == [0, 0]
    assert job_state(job.job_id, slurm_cluster).get("Restarts") == "1"
    reasons = sorted(json.loads((p / "trainer_state.json").read_text())["reason"]
                     for p in (out / "checkpoints").glob("step-*") if p.is_dir())
    assert "signal" in reasons and "end" in reasons
    assert launch.losses(out) == reference


def test_preprocess_array_equals_one_local_run(slurm_cluster, setup, tiny_merged):
    from cllama_dist.assets import corpus_path

    root = setup[3]
    flags = ["--corpus", str(corpus_path()), "--tokenizer", str(tiny_merged), "--block-size", "64",
             "--shard-size-mb", "0.02", "--chunk-mb", "0.02", "--validation-fraction", "0.1"]
    local = subprocess.run(["cllama", "preprocess", *flags, "--output", str(root / "local"), "--workers", "1"],
                           capture_output=True, text=True)
    assert local.returncode == 0, local.stderr
    env = {**slurm_cluster, "CPUS": "1", "TIME": "00:10:00", "LOG_DIR": str(root)}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "preprocess.sh"), "3", *flags, "--output", str(root / "array")],
                          capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr
    array_id = proc.stdout.split("submitted array job ")[1].split()[0]
    final_id = proc.stdout.split("finalize job ")[1].split()[0]
    assert wait_job(final_id, slurm_cluster)["JobState"] == "COMPLETED"
    assert len(list(root.glob(f"cllama-preprocess-{array_id}_*.out"))) == 3
    a = json.loads((root / "array" / "manifest.json").read_text())
    b = json.loads((root / "local" / "manifest.json").read_text())
    assert a["splits"] == b["splits"] and len(a["splits"]["train"]["shards"]) > 3
    for shard in a["splits"]["train"]["shards"] + a["splits"]["validation"]["shards"]:
        assert (root / "array" / shard["file"]).read_bytes() == (root / "local" / shard["file"]).read_bytes()
