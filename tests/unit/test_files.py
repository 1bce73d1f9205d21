"""Outputs never touch inputs, only our own folders are ever deleted, one writer per output."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from cllama_dist.errors import UserError
from cllama_dist.files import LOCK, MARKER, Lock, check_file_output, check_not_input, claim_folder, os_error


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.model").write_bytes(b"x")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("{}\n")
    for out, relation in ((model, "is"), (tmp_path, "contains"), (model / "sub", "lies inside")):
        with pytest.raises(UserError, match=f"output {out} {relation} the base model"):
            check_not_input(out, {"base model": model}, "merged-model")
    with pytest.raises(UserError, match="contains the tokenizer"):
        check_not_input(model, {"tokenizer": model / "tokenizer.model"}, "tokenizer")
    with pytest.raises(UserError, match="is the corpus"):
        check_not_input(corpus, {"corpus": [tmp_path / "other.jsonl", corpus]}, "report")
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(UserError, match="is the base model"):  # real paths: a symlink is no way round
        check_not_input(link, {"base model": model}, "merged-model")
    check_not_input(tmp_path / "elsewhere", {"base model": model, "corpus": corpus}, "x")
    check_not_input(tmp_path / "corpus.jsonl.d", {"corpus": corpus}, "x")  # a file input has no inside


def test_only_our_folders_of_the_same_kind_are_ever_replaced(tmp_path):
    out = claim_folder(tmp_path / "a" / "shards", "shards")
    assert json.loads((out / MARKER).read_text())["kind"] == "shards"
    (out / "train-000000.arrow").write_bytes(b"x")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        claim_folder(out, "shards")
    assert claim_folder(out, "shards", reuse=True) == out and (out / "train-000000.arrow").exists()
    claim_folder(out, "shards", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    (out / "x").write_text("1")
    with pytest.raises(UserError, match=r"holds cllama-dist output of another kind \(shards\)"):
        claim_folder(out, "tokenizer", overwrite=True)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="did not create .* never deleted"):
        claim_folder(foreign, "shards", overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "years of work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        claim_folder(tmp_path / "file", "run")
    legacy = tmp_path / "old_shards"  # made by an earlier version: recognised by its files
    legacy.mkdir()
    (legacy / "plan.json").write_text("{}")
    claim_folder(legacy, "shards", reuse=True)


def test_file_outputs(tmp_path):
    with pytest.raises(UserError, match="is a folder, not a file path"):
        check_file_output(tmp_path, "report")
    assert check_file_output(tmp_path / "new" / "r.json", "report").parent.is_dir()


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    first = Lock(tmp_path / LOCK, "preprocess task").acquire()
    with pytest.raises(UserError) as err:
        Lock(tmp_path / LOCK, "preprocess task").acquire()
    msg = str(err.value)
    assert f"pid {os.getpid()} on {socket.gethostname()} since" in msg and "being written by another preprocess task" in msg
    first.release()
    assert not (tmp_path / LOCK).exists()
    with Lock(tmp_path / LOCK, "x"):
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_whose_holder_is_gone_is_taken_over_saying_so(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / LOCK).write_text(json.dumps({"token": "t", "host": socket.gethostname(), "pid": int(dead),
                                             "since": "yesterday", "what": "training run"}))
    with Lock(tmp_path / LOCK, "training run") as lock:
        assert lock.took_over and f"process {dead} no longer runs" in lock.took_over["why"]
    assert f"took over the lock {tmp_path / LOCK} of pid {dead}" in capsys.readouterr().out
    # Another host: alive unless its heartbeat is old.
    (tmp_path / LOCK).write_text(json.dumps({"token": "t", "host": "node-elsewhere", "pid": 1, "since": "s"}))
    with pytest.raises(UserError, match="pid 1 on node-elsewhere"):
        Lock(tmp_path / LOCK, "x").acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK, (old, old))
    lock = Lock(tmp_path / LOCK, "x").acquire()
    assert "not been refreshed for 60 minutes" in lock.took_over["why"]
    lock.release()
    # A lock file left half-written by a holder that died while writing it.
    (tmp_path / LOCK).write_text('{"tok')
    os.utime(tmp_path / LOCK, (old, old))
    Lock(tmp_path / LOCK, "x").acquire().release()


def test_a_requeued_slurm_job_takes_over_its_earlier_attempt(tmp_path, monkeypatch):
    (tmp_path / LOCK).write_text(json.dumps({"token": "t", "host": "n1", "pid": 5, "slurm_job_id": "77",
                                             "slurm_restart": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock = Lock(tmp_path / LOCK, "training run").acquire()
    assert "earlier attempt of Slurm job 77" in lock.took_over["why"]
    lock.release()


def test_os_errors_become_one_line_with_the_cause(tmp_path):
    e = os_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x.arrow")
    assert str(e).startswith(f"cannot write {tmp_path / 'x.arrow'}: disk full (") and "MB free there" in str(e)
    assert str(os_error(PermissionError(errno.EACCES, "Permission denied", "/r/f"), "/r/f", "read")) == \
        "cannot read /r/f: permission denied"
