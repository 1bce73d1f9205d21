"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases and MLflow (optional).

    logging:
      trackers: [wandb, mlflow]
      wandb_project: chinese-llama        # wandb_mode: offline (default: files under RUN/wandb, `wandb sync` later)
      mlflow_tracking_uri: ""             # default: file:RUN/mlruns (browse with `mlflow ui --backend-store-uri ...`)

Rank 0 only. Each tracker receives the run's resolved config once at start and every metrics record with its
step: the same numbers as metrics.jsonl. Offline / local-file modes are the defaults, because cluster nodes
often have no internet; both write under the run folder. A tracker that is not installed is refused at start
with the pip command, not at the first log line.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

from ..errors import UserError


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    kind = record.get("type", "train")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "type", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and prefix.count(".") < 1:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict, project: str, mode: str, name: str):
        try:
            import wandb
        except ImportError:
            raise UserError("logging.trackers names wandb, which is not installed: pip install wandb") from None
        self.wandb = wandb
        # resume="allow" with a fixed id: a resumed run continues the same W&B run instead of starting a new one.
        run_id = "".join(c if c.isalnum() else "-" for c in name)[-64:]
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", mode=mode,
                              dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        values = _numbers(record)
        if values:
            self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    def __init__(self, run_dir: Path, config: dict, tracking_uri: str, experiment: str, name: str):
        try:
            import mlflow
        except ImportError:
            raise UserError("logging.trackers names mlflow, which is not installed: pip install mlflow-skinny "
                            "(or mlflow)") from None
        self.mlflow = mlflow
        uri = tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store only behind this switch; a folder is what a cluster job without a
            # tracking server can write (SQLite on NFS is not safe).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment)
        # One MLflow run per training run, found again by its name on resume.
        found = mlflow.search_runs(filter_string=f"tags.cllama_run = '{name}'", output_format="list")
        self.run = mlflow.start_run(run_id=found[0].info.run_id) if found else \
            mlflow.start_run(run_name=Path(name).name, tags={"cllama_run": name})
        if not found:
            flat = _flat(config)
            for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params(dict(list(flat.items())[i:i + 100]))
        mlflow.log_dict(config, "config.json")

    def log(self, record: dict[str, Any]) -> None:
        values = _numbers(record)
        if values:
            self.mlflow.log_metrics({k.replace("/", "."): v for k, v in values.items()}, step=int(record["step"]))

    def close(self) -> None:
        self.mlflow.end_run()


def open_trackers(names: list[str], run_dir: Path, config: dict, logging_cfg) -> list[Tracker]:
    """The trackers a run asked for (rank 0 calls this)."""
    name = str(Path(run_dir).resolve())
    out: list[Tracker] = []
    for n in names:
        if n == "wandb":
            out.append(WandbTracker(run_dir, config, logging_cfg.wandb_project, logging_cfg.wandb_mode, name))
        elif n == "mlflow":
            out.append(MLflowTracker(run_dir, config, logging_cfg.mlflow_tracking_uri, logging_cfg.mlflow_experiment,
                                     name))
    return out
