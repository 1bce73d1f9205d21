import math
import random

import pytest
import sentencepiece as spm
import torch

from cllama_dist.errors import UserError
from cllama_dist.eval import evaluate, windows
from cllama_dist.eval.config import EvalConfig
from cllama_dist.eval.run import format_result

from ..conftest import TINY_LLAMA, write_jsonl

DOCS = ["中文的分词是一个老问题。", "The quick brown fox jumps over the lazy dog.", "混合 text 与数字 2024 年。"]


@pytest.mark.parametrize("block", [2, 3, 7, 64])
def test_windows_predict_every_token_once(block):
    rng = random.Random(block)
    for n in (1, 2, block - 1, block, block + 1, 5 * block + 3):
        ids = [rng.randrange(3, 100) for _ in range(max(n, 1))]
        ws = windows(ids, 1, block)
        assert all(2 <= len(w) <= block for w in ws)
        assert [t for w in ws for t in w[1:]] == ids  # targets, in order, each once
        assert ws[0][0] == 1


@pytest.fixture
def uniform_model(tmp_path, tiny_base):
    """A LLaMA whose final norm is zero: every logit is 0, so every token costs exactly ln(V) nats."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model")).get_piece_size()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY_LLAMA))
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(tmp_path / "uniform")
    return tmp_path / "uniform", vocab


def test_bits_per_character_by_hand(uniform_model, tiny_base, tmp_path):
    path, vocab = uniform_model
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCS])
    sp = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    tokens = sum(len(sp.encode(t)) for t in DOCS)
    chars = sum(len(t) for t in DOCS)
    nbytes = sum(len(t.encode("utf-8")) for t in DOCS)
    r = evaluate(EvalConfig(model=str(path), tokenizer=str(tiny_base), inputs=[str(data)], block_size=5))
    assert r["tokens"] == tokens and r["characters"] == chars and r["bytes"] == nbytes and r["documents"] == 3
    assert r["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert r["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert r["bits_per_char"] == pytest.approx(tokens * math.log2(vocab) / chars, rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(tokens * math.log2(vocab) / nbytes, rel=1e-6)
    assert r["tokens_per_char"] == pytest.approx(tokens / chars)
    # a uniform model pays exactly the uniform baseline, log2 V x tokens per character
    assert r["uniform_bits_per_char"] == pytest.approx(r["bits_per_char"], rel=1e-6)
    assert "baseline   " in format_result(r) and format_result(r).endswith("0.0% of it")


def test_scores_equal_a_direct_computation_whatever_the_batching(tiny_model_dir, tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCS])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    nll = 0.0
    with torch.no_grad():
        for t in DOCS:
            x = torch.tensor([[1] + sp.encode(t)])
            logp = model(input_ids=x).logits[0, :-1].log_softmax(-1)
            nll -= logp.gather(1, x[0, 1:, None]).sum().item()
    tokens = sum(len(sp.encode(t)) for t in DOCS)
    whole = evaluate(EvalConfig(model=str(tiny_model_dir), tokenizer=str(tiny_base), inputs=[str(data)],
                                block_size=256, batch_size=3))
    assert whole["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    # Padded batches of one vs many give the same figures; short windows only lose context.
    single = evaluate(EvalConfig(model=str(tiny_model_dir), tokenizer=str(tiny_base), inputs=[str(data)],
                                 block_size=256, batch_size=1))
    assert single["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    short = evaluate(EvalConfig(model=str(tiny_model_dir), tokenizer=str(tiny_base), inputs=[str(data)],
                                block_size=4, batch_size=2))
    assert short["tokens"] == whole["tokens"]


def test_generate_reports_speed(tiny_model_dir, tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": DOCS[0]}])
    r = evaluate(EvalConfig(model=str(tiny_model_dir), tokenizer=str(tiny_base), inputs=[str(data)],
                            generate=True, prompts=["中国", "hello"], max_new_tokens=5,
                            json_out=str(tmp_path / "e.json")))
    assert [g["prompt"] for g in r["generations"]] == ["中国", "hello"]
    assert all(g["new_tokens"] == 5 and g["tokens_per_second"] > 0 for g in r["generations"])
    assert (tmp_path / "e.json").is_file()


def test_shards_loss_and_refusals(tiny_model_dir, tiny_base, tiny_merged, tiny_shards, tmp_path):
    # The base model cannot read shards of the merged tokenizer: more pieces than embedding rows.
    with pytest.raises(UserError, match="pieces but the model .* has"):
        evaluate(EvalConfig(model=str(tiny_model_dir), tokenizer=str(tiny_merged), shards=str(tiny_shards)))
    # Shards made with another tokenizer are refused, naming both fingerprints.
    with pytest.raises(UserError, match="do not match.*vocab size: shards"):
        evaluate(EvalConfig(model=str(tiny_model_dir), tokenizer=str(tiny_base), shards=str(tiny_shards)))
    with pytest.raises(UserError, match="either --inputs"):
        EvalConfig(model=str(tiny_model_dir))
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        evaluate(EvalConfig(model=str(tmp_path), inputs=["x.jsonl"]))


def test_shards_of_the_right_tokenizer(tmp_path, tiny_merged, tiny_shards):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cllama_dist.data.shards import load_manifest

    vocab = load_manifest(tiny_shards)["tokenizer"]["vocab_size"]
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY_LLAMA)).save_pretrained(tmp_path / "m")
    r = evaluate(EvalConfig(model=str(tmp_path / "m"), tokenizer=str(tiny_merged), shards=str(tiny_shards),
                            max_documents=5))
    assert r["documents"] == 5 and r["tokens"] == 5 * 63
    # format cllama-shards/2: the blocks' own characters (n_chars) give bits per character
    from cllama_dist.data.loader import text_sizes

    chars = int(text_sizes(tiny_shards, load_manifest(tiny_shards), "validation")[0][:5].sum())
    assert r["characters"] == chars and r["bits_per_char"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / chars)
    assert 0 < r["loss"] < 2 * math.log(vocab)


def test_named_inputs_give_a_table_per_model(uniform_model, tiny_model_dir, tiny_base, tmp_path):
    """--text zh=... en=... with --compare: one column per model, bits per character per input, each cell what a
    plain `cllama eval` of that model on that input gives; the uniform model's cells equal their baseline."""
    import json
    import shutil

    path, _ = uniform_model
    rand = tmp_path / "rand"
    shutil.copytree(tiny_model_dir, rand)
    for folder in (path, rand):
        shutil.copy(tiny_base / "tokenizer.model", folder / "tokenizer.model")
    zh = write_jsonl(tmp_path / "zh.jsonl", [{"text": DOCS[0]}, {"text": DOCS[2]}])
    en = write_jsonl(tmp_path / "en.jsonl", [{"text": DOCS[1]}])
    out = tmp_path / "t.json"
    r = evaluate(EvalConfig(model=str(path), text=[f"zh={zh}", f"en={en}"], compare=[f"rand={rand}"],
                            block_size=16, json_out=str(out)))
    t = r["table"]
    assert t["models"] == ["model", "rand"] and t["inputs"] == ["zh", "en"]
    for name in ("zh", "en"):
        u = t["cells"]["model"][name]
        assert u["bits_per_char"] == pytest.approx(u["uniform_bits_per_char"], rel=1e-6)
    alone = evaluate(EvalConfig(model=str(rand), inputs=[str(en)], block_size=16))
    assert t["cells"]["rand"]["en"]["bits_per_char"] == pytest.approx(alone["bits_per_char"], rel=1e-6)
    assert json.loads(out.read_text())["table"]["cells"]["rand"]["zh"]["tokens"] == t["cells"]["rand"]["zh"]["tokens"]
    text = format_result(r)
    assert text.splitlines()[1].split() == ["input", "model", "rand", "change", "vs", "model"]
    d = t["cells"]["rand"]["zh"]["bits_per_char"] - t["cells"]["model"]["zh"]["bits_per_char"]
    assert f"rand {d:+.4f}" in text
    with pytest.raises(UserError, match="compare_base: needs --adapter"):
        EvalConfig(model=str(path), text=[f"zh={zh}"], compare_base=True)
    with pytest.raises(UserError, match="expected NAME=PATH"):
        EvalConfig(model=str(path), text=[str(zh)])
    with pytest.raises(UserError, match="not both"):
        EvalConfig(model=str(path), text=[f"zh={zh}"], inputs=[str(zh)])


def test_named_shard_sets_in_the_table(tmp_path, tiny_base, tiny_merged, tiny_shards, uniform_model):
    """--shard-sets: bits per character from the shards' n_chars; a model of another tokenizer shows n/a, named."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from cllama_dist.data.shards import load_manifest

    vocab = load_manifest(tiny_shards)["tokenizer"]["vocab_size"]
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY_LLAMA)).save_pretrained(tmp_path / "m")
    shutil.copy(tiny_merged / "tokenizer.model", tmp_path / "m" / "tokenizer.model")
    base, _ = uniform_model
    shutil.copy(tiny_base / "tokenizer.model", base / "tokenizer.model")
    r = evaluate(EvalConfig(model=str(tmp_path / "m"), shard_sets=[f"zh={tiny_shards}"], compare=[f"base={base}"],
                            max_documents=4))
    cells = r["table"]["cells"]
    assert cells["model"]["zh"]["documents"] == 4 and cells["model"]["zh"]["bits_per_char"] > 0
    assert "do not match" in cells["base"]["zh"]["error"]
    text = format_result(r)
    assert "n/a" in text and "n/a: base on zh:" in text
