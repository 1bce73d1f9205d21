"""configs/tiny-cpu.yaml runs as its opening comment says: `cllama train --config configs/tiny-cpu.yaml
--nproc-per-node 2`, from a folder that is not the checkout (its relative paths are the run's folder's), here
on the tests' tiny model, tokenizer and shards in place of the demo's and for two steps; then a Ctrl-C
(SIGINT to the launching process, as a terminal sends it) saves at the next step boundary and ends in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from cllama_dist import PROJECT_ROOT
from cllama_dist.trainer.metrics import read_metrics

from . import launch

CONFIG = PROJECT_ROOT / "configs" / "tiny-cpu.yaml"


def cllama_train(setup, *extra) -> list[str]:
    model, tok, shards, _ = setup
    return [sys.executable, "-m", "cllama_dist.cli", "train", "--config", str(CONFIG), "--nproc-per-node", "2",
            "--model.path", str(model), "--model.tokenizer", str(tok), "--data.path", str(shards), *extra]


def test_the_tiny_cpu_config_trains_from_another_folder(setup, tmp_path):
    r = subprocess.run(cllama_train(setup, "--optim.max-steps", "2"), cwd=tmp_path, env=launch.env(2),
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "tiny-cpu"  # output_dir: runs/tiny-cpu, relative to the folder it ran in
    assert [rec["step"] for rec in read_metrics(run, "train")] == [1, 2]
    assert (run / "checkpoints" / "step-00000002" / "files.json").is_file()
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_ctrl_c_saves_and_ends_in_one_line(setup, tmp_path):
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cllama_train(setup, "--optim.max-steps", "500", "--logging.log-every", "1"),
                                cwd=tmp_path, env=launch.env(2), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        run = tmp_path / "runs" / "tiny-cpu"
        deadline = time.monotonic() + 300
        while not (run / "metrics.jsonl").exists() or len(read_metrics(run, "train")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the foreground group (here: cllama alone)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 128 + signal.SIGINT, text[-3000:]
    assert "Traceback" not in text
    assert "cllama train: SIGINT received" in text.strip().splitlines()[-1]
    saved = [p.name for p in (run / "checkpoints").glob("step-*") if (p / "files.json").is_file()]
    assert saved and "(signal)" in text
