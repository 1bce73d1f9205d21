"""W&B and MLflow in their offline / local-file modes: the resolved config and every metrics record arrive."""

from __future__ import annotations

import time

import pytest

from cllama_dist.trainer.config import LoggingConfig
from cllama_dist.trainer.metrics import Logger

CONFIG = {"optim": {"lr": 1e-4, "max_steps": 3}, "seed": 7}


def _log(tmp_path, names):
    from cllama_dist.trainer.trackers import open_trackers

    trackers = open_trackers(names, tmp_path, CONFIG, LoggingConfig(trackers=names))
    log = Logger(tmp_path, tensorboard=False, resume_step=-1, trackers=trackers)
    for step in (1, 2, 3):
        log.log({"type": "train", "step": step, "loss": 1.0 / step, "lr": 1e-4, "skipped": False})
    log.log({"type": "eval", "step": 3, "loss": 0.25, "perplexity": 1.28})
    return trackers, log


def test_mlflow_file_store_gets_config_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    trackers, log = _log(tmp_path, ["mlflow"])
    run_id = trackers[0].run.info.run_id
    log.close()
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").resolve().as_uri())
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train.loss")] == \
        [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert client.get_metric_history(run_id, "eval.perplexity")[0].value == 1.28
    params = client.get_run(run_id).data.params
    assert params["optim.lr"] == "0.0001" and params["seed"] == "7"


def test_wandb_offline_run_gets_config_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers, log = _log(tmp_path, ["wandb"])
    run = trackers[0].run
    assert run.config["optim"]["lr"] == 1e-4
    log.log({"type": "train", "step": 4, "loss": 0.2})  # W&B commits a step's row when the next step arrives
    assert run.summary["train/loss"] == pytest.approx(1 / 3) and run.summary["eval/perplexity"] == 1.28
    log.close()
    (records,) = list(tmp_path.glob("wandb/offline-run-*/*.wandb"))
    # The offline transaction log `wandb sync` uploads. W&B's service process writes it and may still be
    # flushing when finish() returns on a loaded machine (seen: only the file header, once, at load 8 on
    # 2 cores), so the test waits for it, up to a bound, rather than racing that process.
    deadline = time.monotonic() + 60
    while True:
        data = records.read_bytes()
        if (b"train/loss" in data and b"eval/perplexity" in data) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert b"train/loss" in data and b"eval/perplexity" in data


def test_a_tracker_that_is_not_installed_is_refused_with_the_pip_command(tmp_path, monkeypatch):
    import builtins

    from cllama_dist.errors import UserError
    from cllama_dist.trainer.trackers import open_trackers

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name in ("wandb", "mlflow") else real(name, *a, **k))
    with pytest.raises(UserError, match="pip install wandb"):
        open_trackers(["wandb"], tmp_path, CONFIG, LoggingConfig())
