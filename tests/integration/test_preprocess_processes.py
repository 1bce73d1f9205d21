"""Preprocessing as real processes: worker pools, several tasks started as separate commands, a SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cllama_dist.data.config import PreprocessConfig
from cllama_dist.data.pipeline import GROUPS
from cllama_dist.data.preprocess import preprocess
from cllama_dist.data.shards import load_manifest, verify_shards

from ..conftest import write_jsonl
from ..unit.test_preprocess import BLOCK, cfg, corpus, folder_digest  # noqa: F401,F811  (corpus: a fixture)


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


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cllama_dist.cli", *args]


def test_two_runs_into_one_output_one_writer_wins_the_other_is_refused(tiny_merged, tmp_path, zh_docs):
    """Two `cllama preprocess` started 0.5 s apart into one folder: the second is refused naming the first (it
    used to run too, and a shard was recorded as 0 bytes with the sha256 of an empty file)."""
    # Big enough (about 20 MB) that the first run still writes when the second has started (python's start-up).
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"{t}（{k}）"} for k in range(150) for t in zh_docs])
    out = tmp_path / "o"
    args = _cli("preprocess", "--corpus", str(big), "--tokenizer", str(tiny_merged), "--output", str(out),
                "--block-size", str(BLOCK), "--chunk-mb", "1", "--shard-size-mb", "0.5", "--workers", "1")
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "plan.json").exists():
        time.sleep(0.02)  # python's start-up takes longer than 0.5 s here: start the clock when it writes
    time.sleep(0.5)
    assert first.poll() is None, "the first run ended before the second started: make the corpus bigger"
    # Paused while the second runs: on a loaded machine the second's start-up could otherwise outlast the
    # first's whole run (seen in CI-like load), and the test would race instead of testing the lock.
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2, second.stderr
    msg = second.stderr.strip().splitlines()[-1]
    assert f"is being written by another preprocess task 0 of 1: pid {first.pid}" in msg, second.stderr
    m = load_manifest(out)
    verify_shards(out, m)  # every shard: size, sha256, rows, ids
    preprocess(PreprocessConfig(inputs=[str(big)], tokenizer=str(tiny_merged), output=str(tmp_path / "clean"),
                                block_size=BLOCK, chunk_mb=1, shard_size_mb=0.5, workers=2))
    assert folder_digest(out) == folder_digest(tmp_path / "clean")
    assert not list(out.glob(".task-*.lock")) and not (out / ".cllama.lock").exists()


@pytest.mark.parametrize("stage", ["preprocess", "tokenizer train"])
def test_a_fifo_in_the_corpus_folder_does_not_hang(tiny_merged, tmp_path, zh_docs, stage):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": t} for t in zh_docs])
    os.mkfifo(corpus / "b.jsonl")
    if stage == "preprocess":
        args = _cli("preprocess", "--corpus", str(corpus), "--tokenizer", str(tiny_merged), "--output",
                    str(tmp_path / "o"), "--block-size", str(BLOCK), "--workers", "1")
    else:
        args = _cli("tokenizer", "train", "--inputs", str(corpus), "--output", str(tmp_path / "zh"),
                    "--vocab-size", "3000", "--threads", "1")
    r = subprocess.run(args, capture_output=True, text=True, timeout=240)  # it used to block forever on the FIFO
    assert r.returncode == 0, r.stderr
    assert f"skipped 1 special file (FIFO, socket or device), never opened: {corpus / 'b.jsonl'}" in r.stderr
    r = subprocess.run(args[:args.index(str(corpus))] + [str(corpus / "b.jsonl")] + args[args.index(str(corpus)) + 1:],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "b.jsonl is a FIFO (named pipe), not a regular file" in r.stderr, r.stderr


def _unshare_works() -> bool:
    import shutil

    return bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "-m", "true"] if os.geteuid() == 0 else ["unshare", "-r", "-m", "true"],
        capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare (a private mount of a small tmpfs)")
def test_a_full_disk_is_said_so_partial_files_removed_committed_groups_kept(tiny_merged, tmp_path, zh_docs):
    """A real full filesystem: a 1 MB tmpfs mounted in a private mount namespace (nothing outside sees it)."""
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"{t}（{k}）"} for k in range(20) for t in zh_docs])
    disk = tmp_path / "disk"
    disk.mkdir()
    report = tmp_path / "report.json"
    script = f"""
import json, subprocess, sys, os
from pathlib import Path
out = Path({str(disk / 'o')!r})
args = {_cli('preprocess', '--corpus', str(big), '--tokenizer', str(tiny_merged), '--output', str(disk / 'o'),
             '--block-size', str(BLOCK), '--chunk-mb', '0.2', '--shard-size-mb', '0.1', '--workers', '1')!r}
r = subprocess.run(args, capture_output=True, text=True)
files = sorted(str(p.relative_to(out)) for p in out.rglob('*'))
groups = len(list((out / '.groups').glob('group-*.json')))
total = len(json.loads((out / 'plan.json').read_text())['groups'])
# Room again (a bigger tmpfs over the same folder is not possible: copy out, remount, copy back).
Path({str(report)!r}).write_text(json.dumps({{"rc": r.returncode, "stderr": r.stderr, "files": files,
                                              "groups": groups, "total": total}}))
"""
    unshare = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    sh = f"mount -t tmpfs -o size=1m tmpfs {disk} && {sys.executable} -c \"$0\""
    r = subprocess.run([*unshare, "sh", "-c", sh, script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 0, r.stderr
    got = json.loads(report.read_text())
    assert got["rc"] == 2, got["stderr"]
    last = got["stderr"].strip().splitlines()[-1]
    assert "Traceback" not in got["stderr"] and ": disk full" in last and str(disk / "o") in last, got["stderr"]
    assert "groups are committed and kept" in last
    assert 0 < got["groups"] < got["total"], got
    assert not [f for f in got["files"] if f.endswith(".tmp") and f != ".tmp" or f.startswith(".tmp/")], got["files"]
