"""Shared test fixtures.

Real-world fixtures (LLaMA's tokenizer, the paper's Chinese model, real Chinese prose) are read from
the folder named by CLLAMA_FIXTURES (CI: ../shared/fixtures); tests that need them skip without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cllama_dist.assets import corpus_path

INTEGRATION = Path(__file__).resolve().parent / "integration"


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers added here
def pytest_collection_modifyitems(config, items):
    """Markers that follow from where a test lives or what it uses, so that no file has to remember them:
    everything under tests/integration/ is `integration` (it starts real processes; `-m "not integration"` is the
    fast loop), a test of the real-world fixtures is `fixtures`, and a `gpu` test skips where no CUDA device is."""
    cuda = None
    for item in items:
        if INTEGRATION in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)
        if "real_fixtures" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.fixtures)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
    # The longest files first (the demo, then the other process launches and the real tokenizers), each file's own
    # order kept. Under tests/run.sh's two workers xdist hands out whole files by their number of tests (which
    # interleaves the many-test unit files with the launches) and this order only breaks its ties.
    items.sort(key=_weight)


def _weight(item) -> int:
    path = Path(str(item.path))
    if path.name == "test_demo.py" and INTEGRATION in path.parents:
        return 0
    if INTEGRATION in path.parents or path.parent.name == "real":
        return 1
    return 2


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    d = os.environ.get("CLLAMA_FIXTURES")
    if not d or not Path(d, "llama_tokenizer.model").is_file():
        pytest.skip("real fixtures not available: set CLLAMA_FIXTURES=../shared/fixtures to run this test")
    return Path(d)


@pytest.fixture(scope="session")
def zh_docs() -> list[str]:
    """Texts of the shipped Chinese corpus."""
    return [json.loads(line)["text"] for line in corpus_path().read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A LLaMA-style base tokenizer folder (BPE, byte fallback) trained on stdlib docstrings."""
    from cllama_dist.tokenizer.base import build_base_tokenizer

    out = tmp_path_factory.mktemp("base")
    build_base_tokenizer(out, vocab_size=1000)
    return out


@pytest.fixture(scope="session")
def tiny_zh_model(tmp_path_factory) -> Path:
    """A small Chinese SentencePiece model trained on the shipped corpus."""
    from cllama_dist.tokenizer.config import TokenizerTrainConfig
    from cllama_dist.tokenizer.train import train

    out = tmp_path_factory.mktemp("zh")
    train(TokenizerTrainConfig(inputs=[str(corpus_path())], output=str(out / "zh"), vocab_size=3000, threads=2))
    return out / "zh.model"


@pytest.fixture(scope="session")
def tiny_merged(tmp_path_factory, tiny_base, tiny_zh_model) -> Path:
    from cllama_dist.tokenizer.config import MergeConfig
    from cllama_dist.tokenizer.merge import merge

    out = tmp_path_factory.mktemp("merged") / "tok"
    merge(MergeConfig(base=str(tiny_base), add=str(tiny_zh_model), out=str(out)))
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Training fixtures: a tiny LLaMA whose vocabulary is the tiny base tokenizer's, and shards of the
# shipped corpus made with the merged tokenizer.

from cllama_dist.model.presets import TINY as TINY_LLAMA  # noqa: E402  (defined once, shared with bench/)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_base) -> Path:
    """A random-weight LLaMA-architecture model saved as a Hugging Face folder (vocabulary = tiny_base's)."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model")).get_piece_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY_LLAMA))
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_merged) -> Path:
    from cllama_dist.data.config import PreprocessConfig
    from cllama_dist.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("shards") / "shards"
    preprocess(PreprocessConfig(inputs=[str(corpus_path())], tokenizer=str(tiny_merged), output=str(out),
                                block_size=64, validation_fraction=0.1, workers=1))
    return out
