import subprocess
import sys


def test_offline_stage_never_imports_torch():
    """The offline stage runs on CPU nodes and must start fast: no torch, no deepspeed, no transformers."""
    code = (
        "import sys\n"
        "import cllama_dist.cli, cllama_dist.tokenizer.train, cllama_dist.tokenizer.merge, "
        "cllama_dist.tokenizer.report, cllama_dist.data.corpus, cllama_dist.data.preprocess, cllama_dist.data.shards\n"
        "bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
