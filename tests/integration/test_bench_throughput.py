"""bench/train_throughput.py in its --tiny --device cpu mode: the same code paths as on a GPU, in about a minute."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from . import launch

BENCH = launch.REPO / "bench" / "train_throughput.py"


def test_tiny_cpu_run_measures_every_variant_side_by_side(tmp_path):
    out = tmp_path / "tp"
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--warmup", "1", "--steps", "1",
                           "--out", str(out), "--append-docs", str(docs),
                           "--variant", "zero2:engine.single_process_zero2=true"],
                          capture_output=True, text=True, env=launch.env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert list(report["results"]) == ["128", "64"]
    assert list(report["results"]["128"]) == ["ours-new-rows", "ours-full", "reference", "zero2"]
    assert list(report["results"]["64"]) == ["ours-new-rows", "ours-full", "reference"]  # extras: first length only
    for seq, row in report["results"].items():
        ref = row["reference"]
        for name, r in row.items():
            assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0 and r["peak_memory_bytes"] > 0, (seq, name)
            assert r["tokens_per_s"] == pytest.approx(2 * int(seq) / r["step_time_s"])
            # What the optimizer holds, measured: fp32 masters + Adam's two moments = 12 bytes per trained
            # parameter (plus one 4-byte step counter per parameter group).
            assert 12 * r["trainable_parameters"] <= r["optimizer_state_bytes"] <= 12 * r["trainable_parameters"] + 64
            if name != "reference":
                assert r["speedup_vs_reference"] == pytest.approx(r["tokens_per_s"] / ref["tokens_per_s"])
        # The paper's way trains every row of both matrices (modules_to_save): as many as `full`, more than new-rows.
        assert row["ours-full"]["trainable_parameters"] == ref["trainable_parameters"]
        assert row["ours-new-rows"]["trainable_parameters"] < ref["trainable_parameters"]
    # The reference and our default ran the ZeRO-3 config; the variant, its single-process ZeRO-2 form.
    stages = {name: r["zero_stage"] for name, r in report["results"]["128"].items()}
    assert stages == {"ours-new-rows": 3, "ours-full": 3, "reference": 3, "zero2": 2}
    md = docs.read_text()
    assert md.startswith("# Benchmarks\n") and "| 128 | ours-new-rows |" in md and "| 64 | reference |" in md
    assert "not judged on the CPU" in md
