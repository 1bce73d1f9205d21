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
        "cllama_dist.tokenizer.report, cllama_dist.data.corpus, cllama_dist.data.preprocess, cllama_dist.data.shards, "
        "cllama_dist.data.pipeline, cllama_dist.data.sft\n"
        "cllama_dist.cli.build_parser()\n"
        "import cllama_dist.trainer, cllama_dist.eval, cllama_dist.export, cllama_dist.recipes.demo\n"
        "bad = [m for m in ('torch', 'deepspeed', 'transformers', 'peft', 'submitit') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# What DeepSpeed prints when imported (it guessed the accelerator) and while it reads a ZeRO checkpoint.
DEEPSPEED_NOISE = ("real_accelerator", "Setting accelerator to", "Processing zero checkpoint",
                   "Parsing checkpoint created by deepspeed", "Detected checkpoint of type",
                   "Reconstructed Trainable fp32 state dict")


def test_export_says_what_it_wrote_and_none_of_deepspeeds_lines(setup, reference, tmp_path):
    """`cllama export` in a fresh interpreter: its one line of result, none of DeepSpeed's accelerator warning and
    checkpoint-conversion lines (--verbose shows them), and a checkpoint DeepSpeed cannot read is one line too."""
    import shutil

    def cllama(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cllama_dist.cli", *args], capture_output=True, text=True)

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    for args, out in ((("export", "adapter", "--run", str(reference[0]), "--out", str(adapter)), adapter),
                      (("export", "merged", "--base", str(setup[0]), "--adapter", str(adapter), "--out", str(merged)),
                       merged)):
        r = cllama(*args)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"wrote {out}: ") and len(r.stdout.splitlines()) == 1, r.stdout
        noise = [n for n in DEEPSPEED_NOISE if n in r.stdout or n in r.stderr]
        assert not noise, (noise, r.stdout, r.stderr)
    r = cllama("export", "adapter", "--run", str(reference[0]), "--out", str(tmp_path / "v"), "--verbose")
    assert r.returncode == 0 and "Processing zero checkpoint" in r.stdout  # muted, not removed
    # An older checkpoint (no files.json to check it against) that lost a partition: DeepSpeed's error, one line.
    step = sorted((reference[0] / "checkpoints").glob("step-*"))[-1]
    broken = tmp_path / "broken" / "checkpoints" / step.name
    shutil.copytree(step, broken)
    (broken / "files.json").unlink()
    next(broken.glob("*_optim_states.pt")).unlink()
    r = cllama("export", "adapter", "--run", str(tmp_path / "broken"), "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cllama export adapter: error: cannot read the ZeRO checkpoint "
                                                   f"{broken}: ") and "optim_states" in lines[0], r.stderr
