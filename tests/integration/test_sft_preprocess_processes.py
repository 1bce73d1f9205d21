"""Instruction-data preprocessing as real processes: a worker pool, three tasks started as separate commands."""

import subprocess
import sys

import pytest

from cllama_dist.data.sft import preprocess_sft
from cllama_dist.data.shards import load_sft_manifest, verify_shards

from ..unit.test_sft_preprocess import cfg, data, digest  # noqa: F401  (data: a fixture)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_workers_do_not_change_the_bytes(tiny_merged, data, tmp_path, layout):  # noqa: F811
    preprocess_sft(cfg(tiny_merged, data, tmp_path / "w1", layout=layout, workers=1))
    preprocess_sft(cfg(tiny_merged, data, tmp_path / "w2", layout=layout, workers=2))
    assert digest(tmp_path / "w1") == digest(tmp_path / "w2") and len(digest(tmp_path / "w1")) >= 4
    a, b = load_sft_manifest(tmp_path / "w1"), load_sft_manifest(tmp_path / "w2")
    a.pop("created"), b.pop("created")
    assert a == b


def test_three_task_processes_equal_one_run(tiny_merged, data, tmp_path):  # noqa: F811
    preprocess_sft(cfg(tiny_merged, data, tmp_path / "one", layout="packed"))
    args = [sys.executable, "-m", "cllama_dist.cli", "preprocess-sft", "--inputs", str(data), "--tokenizer",
            str(tiny_merged), "--output", str(tmp_path / "three"), "--max-length", "128", "--chunk-mb", "0.004",
            "--shard-size-mb", "0.02", "--validation-fraction", "0.1", "--layout", "packed", "--workers", "1",
            "--num-tasks", "3"]
    procs = [subprocess.Popen(args + ["--task-id", str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
        assert b"cllama preprocess-sft finalize" in out
    assert not (tmp_path / "three" / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-m", "cllama_dist.cli", "preprocess-sft", "finalize", "--output",
                        str(tmp_path / "three")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert digest(tmp_path / "one") == digest(tmp_path / "three")
    verify_shards(tmp_path / "three", load_sft_manifest(tmp_path / "three"))
