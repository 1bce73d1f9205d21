"""transformers 4.x and 5.x load the merged tokenizer folders, give SentencePiece's ids and decode byte-fallback
pieces to the characters they spell (tests/compat/).

Both layouts are written by `merge`: the paper's (SentencePiece only) and "exact" (with tokenizer.json).
With CLLAMA_FIXTURES they come from LLaMA's tokenizer and the paper's Chinese model and are checked on
the whole fixture corpus; without, from the tiny test tokenizers on the shipped corpus. transformers 5
is this environment's; 4.x runs in a virtual environment of its own that tests/compat/run_tf4.sh builds
from PyPI (about 20-40 s the first time, reused afterwards); the test skips when it cannot be built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cllama_dist.assets import corpus_path
from cllama_dist.tokenizer.config import MergeConfig
from cllama_dist.tokenizer.merge import merge


COMPAT = Path(__file__).resolve().parents[1] / "compat"
NO_ENVIRONMENT = 3  # run_tf4.sh: the transformers 4.x environment could not be built


@pytest.fixture(scope="module")
def folders(request, tmp_path_factory) -> tuple[list[Path], list[str]]:
    fixtures = os.environ.get("CLLAMA_FIXTURES")
    if fixtures and Path(fixtures, "llama_tokenizer.model").is_file() and Path(fixtures, "chinese_sp.model").is_file():
        base, add = Path(fixtures, "llama_tokenizer.model"), Path(fixtures, "chinese_sp.model")
        corpus = [str(Path(fixtures, "zh_open_mix.jsonl")), str(corpus_path())]
    else:
        base, add = request.getfixturevalue("tiny_base"), request.getfixturevalue("tiny_zh_model")
        corpus = [str(corpus_path())]
    out = tmp_path_factory.mktemp("compat")
    for mode in ("paper", "exact"):
        merge(MergeConfig(base=str(base), add=str(add), out=str(out / mode), new_piece_score=mode))
    return [out / "paper", out / "exact"], corpus


def _check(cmd: list[str], timeout: int) -> tuple[int, dict | None, str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    try:
        summary = json.loads(proc.stdout)
    except json.JSONDecodeError:
        summary = None
    return proc.returncode, summary, proc.stderr[-3000:]


def _failures(summary: dict) -> list[dict]:
    return [r for r in summary["results"] if not r["ok"]]


def _args(folders) -> list[str]:
    paths, corpus = folders
    return [a for c in corpus for a in ("--corpus", c)] + [str(p) for p in paths]


def _paper_checks(summary: dict) -> dict[str, dict]:
    return {r["check"]: r for r in summary["results"] if r["layout"] == "sentencepiece"}


def _decodes_bytes(checks: dict[str, dict]) -> None:
    """The folder's own class, in the folder and beside a LLaMA config.json, decodes byte-fallback pieces."""
    for where in ("folder", "model folder"):
        r = checks[f"AutoTokenizer(trust_remote_code=True), {where}"]
        assert r["module"].startswith("transformers_modules.") and r["module"].endswith(".tokenization_cllama"), r
        assert r["byte_fallback_texts"] > 0 and r["byte_fallback_decoded"] > 0 and r["byte_decode_differs"] == 0, r
        assert r["ids_differ"] == 0 and r["decode_differs"] == 0 and not r["special_kept_differs"], r
        assert r["cls"] == "CllamaTokenizer"
    assert checks["save_pretrained, then AutoTokenizer(trust_remote_code=True)"]["ok"]


def test_transformers_5(folders):
    code, summary, err = _check([sys.executable, str(COMPAT / "check_hf_load.py"), *_args(folders)], timeout=300)
    assert summary is not None, err
    assert summary["transformers"].startswith("5."), summary["transformers"]
    assert code == 0 and summary["ok"], _failures(summary)
    fast = {(r["layout"], r["check"]): r for r in summary["results"]}[("fast", "AutoTokenizer")]
    assert fast["cls"] == "TokenizersBackend"
    checks = _paper_checks(summary)
    _decodes_bytes(checks)
    r = checks["AutoTokenizer, no trust_remote_code (ids; decode via sp_model.decode)"]
    assert r["cls"] == "SentencePieceBackend" and r["ids_differ"] == 0 and r["texts"] > 0
    # What the folder's code is for: the stock class prints every byte-fallback text wrongly ("<0x..>").
    stock = checks["stock decode of byte-fallback pieces, no trust_remote_code (informational)"]
    assert stock["decode_differs"] == stock["of"] > 0, stock


@pytest.mark.network  # the transformers 4.x environment comes from PyPI
def test_transformers_4(folders):
    code, summary, err = _check(["bash", str(COMPAT / "run_tf4.sh"), *_args(folders)], timeout=600)
    if code == NO_ENVIRONMENT:
        pytest.skip(f"could not build the transformers 4.x environment (offline, or no venv module): {err[-300:]}")
    assert summary is not None, err
    assert summary["transformers"].startswith("4."), summary["transformers"]
    assert not summary["torch_imported"]
    assert code == 0 and summary["ok"], _failures(summary)
    checks = _paper_checks(summary)
    _decodes_bytes(checks)
    assert checks["AutoTokenizer refuses without trust_remote_code"]["ok"]
    assert checks["LlamaTokenizer.from_pretrained"]["ids_differ"] == 0
    fast = {(r["layout"], r["check"]): r for r in summary["results"]}[("fast", "AutoTokenizer")]
    assert fast["cls"] == "PreTrainedTokenizerFast"
