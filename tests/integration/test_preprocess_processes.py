"""Preprocessing as real processes: worker pools, several tasks started as separate commands, a SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cllama_dist.data.config import PreprocessConfig
from cllama_dist.data.preprocess import GROUPS, preprocess
from cllama_dist.data.shards import load_manifest

from ..conftest import write_jsonl
from ..unit.test_preprocess import BLOCK, cfg, corpus, folder_digest  # noqa: F401,F811  (corpus: a fixture)

pytestmark = pytest.mark.integration


def test_workers_do_not_change_the_bytes(tiny_merged, corpus, tmp_path):
    preprocess(cfg(tiny_merged, corpus, tmp_path / "w1", workers=1))
    preprocess(cfg(tiny_merged, corpus, tmp_path / "w2", workers=2))
    assert folder_digest(tmp_path / "w1") == folder_digest(tmp_path / "w2")
    a, b = load_manifest(tmp_path / "w1"), load_manifest(tmp_path / "w2")
    a.pop("created"), b.pop("created")
    assert a == b


def test_three_tasks_equal_one_run(tiny_merged, corpus, tmp_path):
    preprocess(cfg(tiny_merged, corpus, tmp_path / "one"))
    args = [sys.executable, "-m", "cllama_dist.cli", "preprocess", "--corpus", str(corpus), "--tokenizer",
            str(tiny_merged), "--output", str(tmp_path / "three"), "--block-size", str(BLOCK), "--chunk-mb", "0.03",
            "--shard-size-mb", "0.02", "--validation-fraction", "0.1", "--workers", "1", "--num-tasks", "3"]
    procs = [subprocess.Popen(args + ["--task-id", str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in range(3)]
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err.decode()
        assert b"after all tasks" in out
    assert not (tmp_path / "three" / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-m", "cllama_dist.cli", "preprocess", "finalize", "--output",
                        str(tmp_path / "three")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert folder_digest(tmp_path / "one") == folder_digest(tmp_path / "three")


def test_resume_after_sigkill(tiny_merged, tmp_path, zh_docs):
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"{t}（{k}）"} for k in range(60) for t in zh_docs])
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "cllama_dist.cli", "preprocess", "--corpus", str(big), "--tokenizer",
            str(tiny_merged), "--output", str(out), "--block-size", str(BLOCK), "--chunk-mb", "0.2",
            "--shard-size-mb", "0.1", "--workers", "1"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / GROUPS).glob("group-*.json"))) < 3:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    committed = len(list((out / GROUPS).glob("group-*.json")))
    total = len(json.loads((out / "plan.json").read_text())["groups"])
    assert 3 <= committed < total, "the kill should land mid-run"
    assert not (out / "manifest.json").exists()
    assert subprocess.run(args, capture_output=True).returncode == 0
    preprocess(PreprocessConfig(inputs=[str(big)], tokenizer=str(tiny_merged), output=str(tmp_path / "clean"),
                                block_size=BLOCK, chunk_mb=0.2, shard_size_mb=0.1, workers=2))
    assert folder_digest(out) == folder_digest(tmp_path / "clean")
    assert not list(out.glob("*.tmp"))
