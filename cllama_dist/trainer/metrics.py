"""What a run reports: metrics.jsonl, TensorBoard events and console lines (rank 0), throughput and MFU."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..files import write_atomic

METRICS = "metrics.jsonl"


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (of one type: "train" or "eval"), in order; [] before the first.

    Each step appears once: on resume the Logger drops the records past the checkpoint. A last line still
    being written by a live run is left out.
    """
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return [r for r in records if kind is None or r.get("type") == kind]


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Logger:
    """Rank 0 only: metrics.jsonl, TensorBoard events and console lines."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int, trackers=()):
        self.main = dist.is_main()
        self.path = run_dir / METRICS
        self.tb = None
        self.trackers = list(trackers)  # trackers.py: W&B, MLflow (rank 0 only)
        if not self.main:
            return
        if self.path.exists() and resume_step >= 0:
            # Drop records past the checkpoint: those steps are about to be trained again. A torn last line
            # (the earlier attempt was killed while writing it) is dropped too.
            keep = []
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except (json.JSONDecodeError, AttributeError):
                    continue
            write_atomic(self.path, "".join(line + "\n" for line in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step >= 0 else None)
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.jsonl only")

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        # When it happened (runs span days and requeues): a record written later than its step carries its own.
        record = {**record, "time": record.get("time", round(time.time(), 3))}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for t in self.trackers:
            t.log(record)
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "type", "time") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def say(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for t in self.trackers:
            t.close()
        self.trackers = []


class Throughput:
    """Tokens/s, step time, MFU and peak memory over the steps since the last report.

    MFU = tokens/s per device x FLOPs per token / peak FLOP/s; the FLOPs formula is model/flops.py's.
    """

    def __init__(self, tokens_per_step: int, world: int, device: str, flops_per_token: dict[str, float],
                 peak_flops: float):
        self.tokens_per_step, self.world, self.device = tokens_per_step, world, device
        self.flops, self.peak_flops = flops_per_token, peak_flops
        self.restart()

    def restart(self) -> None:
        """Start a new window (after a report, and after a save, which is not training time)."""
        self._t0, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    def report(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self._t0
        tps = self.steps * self.tokens_per_step / elapsed
        out = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world,
               "step_time_s": elapsed / max(self.steps, 1),
               "peak_memory_gib": peak_memory_bytes(self.device) / 2**30}
        if self.peak_flops:
            out["mfu"] = tps / self.world * self.flops["actual"] / self.peak_flops
            out["mfu_conventional"] = tps / self.world * self.flops["conventional"] / self.peak_flops
        self.restart()
        return out


def train_line(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}"]
    if "stage" in r:  # a staged schedule (trainer/stages.py): the stage and the embedding rows' rate
        parts[2:] = [f"stage {r['stage']}", f"lr {r['lr']:.2e}", f"embedding lr {r['embedding_lr']:.2e}"]
    if r.get("grad_norm") is not None:
        parts.append(f"grad norm {r['grad_norm']:.3f}")
    epochs = {k.partition("/")[2]: v for k, v in r.items() if k.startswith("epochs/")}
    if epochs:
        parts.append("epochs " + " ".join(f"{k} {v:.2f}" for k, v in epochs.items()))
    parts.append(f"{r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_s_per_device']:,.0f}/device)")
    if "mfu" in r:
        parts.append(f"MFU {100 * r['mfu']:.1f}% (conventional {100 * r['mfu_conventional']:.1f}%)")
    parts.append(f"peak mem {r['peak_memory_gib']:.2f} GiB")
    return ", ".join(parts)
