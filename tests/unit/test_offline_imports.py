import subprocess
import sys


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
