"""The CLI as users start it: a fresh interpreter, its exit status and its stderr."""

import subprocess
import sys



def test_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff"}\n')
    r = subprocess.run([sys.executable, "-m", "cllama_dist.cli", "tokenizer", "train", "--corpus", str(bad),
                        "--strict", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"cllama tokenizer train: error: {bad}:1: invalid UTF-8")
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "cllama_dist.cli", "tokenizer", "merge", "--base",
                        str(tmp_path / "none.model"), "--add", str(bad), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "tokenizer not found" in r.stderr


def test_offline_stage_and_cli_start_up_never_import_torch():
    """The offline stage runs on CPU nodes and must start fast, and `cllama --help` must be instant: neither the
    CLI (with every stage's parser built) nor the offline modules import torch, deepspeed or transformers."""
    code = (
        "import sys\n"
        "import cllama_dist.cli, cllama_dist.stages, cllama_dist.tokenizer.train, cllama_dist.tokenizer.merge, "
        "cllama_dist.tokenizer.report, cllama_dist.data.corpus, cllama_dist.data.preprocess, cllama_dist.data.shards\n"
        "cllama_dist.cli.build_parser()\n"
        "import cllama_dist.trainer, cllama_dist.eval, cllama_dist.export, cllama_dist.recipes.demo\n"
        "bad = [m for m in ('torch', 'deepspeed', 'transformers', 'peft', 'submitit') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
