"""Byte-level BPE bases: continued-BPE merge on small synthetic tokenizers trained here.

The base is trained on English (standard-library docstrings) with Llama 3's split pattern and two special
tokens kept outside model.vocab after it (Llama 3's layout, DESIGN B3); Chinese falls back to byte tokens.
"""

import json

import pytest

from cllama_dist.assets import corpus_path
from cllama_dist.errors import UserError
from cllama_dist.tokenizer import backend, bpe
from cllama_dist.tokenizer.base import stdlib_docstrings
from cllama_dist.tokenizer.bpe_checks import base_language_texts
from cllama_dist.tokenizer.config import MergeConfig, ReportConfig, TokenizerTrainConfig
from cllama_dist.tokenizer.merge import merge
from cllama_dist.tokenizer.report import report
from cllama_dist.tokenizer.script import ScriptRule
from cllama_dist.tokenizer.train import train

SPECIALS = ["<|begin|>", "<|end|>"]


def make_base(folder, ignore_merges=False, string_merges=False):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(bpe.LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_docstrings(150_000), trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    doc = json.loads(tok.to_str())
    if string_merges:
        doc["model"]["merges"] = [" ".join(m) for m in doc["model"]["merges"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin|>", "eos_token": "<|end|>", "chat_template": "{{ messages[0]['content'] }}",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


@pytest.fixture(scope="module", params=[(False, False), (True, True)], ids=["pairs", "ignore_merges+strings"])
def merged(request, tmp_path_factory):
    ignore, strings = request.param
    root = tmp_path_factory.mktemp("bpe")
    base = make_base(root / "base", ignore, strings)
    train(TokenizerTrainConfig(inputs=[str(corpus_path())], output=str(root / "zh"), vocab_size=1500, base=str(base)))
    out = root / "merged"
    rep = merge(MergeConfig(base=str(base), add=str(root / "zh.json"), out=str(out)))
    return base, out, rep, strings


def _load(path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


def test_base_ids_kept_new_ids_after_specials_and_loaded_file_agrees(merged):
    base_dir, out, rep, _ = merged
    base, tok = _load(base_dir), _load(out)
    bv, v = base.get_vocab(with_added_tokens=True), tok.get_vocab(with_added_tokens=True)
    assert all(v[t] == i for t, i in bv.items())
    specials = [bv[s] for s in SPECIALS]
    new = sorted(i for t, i in v.items() if t not in bv)
    assert rep["first_new_id"] == max(specials) + 1 == new[0]
    assert new == list(range(new[0], new[0] + rep["added"])) and len(set(v.values())) == len(v)
    assert tok.id_to_token(specials[0]) == "<|begin|>"
    assert rep["added"] > 300


def test_base_language_unchanged_chinese_shorter_and_round_trip(merged, zh_docs):
    base_dir, out, rep, _ = merged
    base, tok = _load(base_dir), _load(out)
    assert rep["base_language_changed"] == {"english": 0, "python": 0, "numbers": 0}
    for group in base_language_texts().values():
        assert [e.ids for e in base.encode_batch(group)] == [e.ids for e in tok.encode_batch(group)]
    before = sum(len(e.ids) for e in base.encode_batch(zh_docs))
    after = sum(len(e.ids) for e in tok.encode_batch(zh_docs))
    assert after < 0.7 * before
    assert tok.decode_batch([e.ids for e in tok.encode_batch(zh_docs)]) == zh_docs
    # Special tokens still split out, with their ids.
    assert tok.encode("<|begin|>中文").ids[0] == base.token_to_id("<|begin|>")


def test_no_unreachable_new_token_and_every_new_token_holds_han(merged):
    from cllama_dist.tokenizer.bpe_merge import unreachable
    from cllama_dist.tokenizer.script import token_bytes

    base_dir, out, rep, _ = merged
    base, tok = _load(base_dir), _load(out)
    bv = base.get_vocab(with_added_tokens=True)
    new = {t: i for t, i in tok.get_vocab(with_added_tokens=True).items() if t not in bv}
    assert rep["unreachable_kept"] == 0 and unreachable(tok, new) == []
    rule = ScriptRule("Han")
    assert all(rule.holds_script(token_bytes(t)) for t in new)


def test_merges_serialisation_of_the_base_is_kept(merged):
    _, out, rep, strings = merged
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    assert isinstance(merges[-1], str) == strings
    assert rep["merges_serialisation"] == ("strings" if strings else "pairs")


def test_fingerprint_ignores_serialisation(tmp_path):
    a = make_base(tmp_path / "a")
    b = make_base(tmp_path / "b", string_merges=True)
    fa, fb = backend.fingerprint(a), backend.fingerprint(b)
    assert fa["sha256"] == fb["sha256"] and fa["backend"] == "bpe" and fa["vocab_size"] == 702
    assert fa["special_ids"] == {"<|begin|>": 700, "<|end|>": 701}


def test_hf_folder_loads_with_autotokenizer(merged, zh_docs):
    from transformers import AutoTokenizer

    _, out, _, _ = merged
    hf, tok = AutoTokenizer.from_pretrained(str(out)), _load(out)
    texts = zh_docs[:30] + ["Hello, world 12345", "def f(x):\n    return x"]
    assert [hf.encode(t, add_special_tokens=False) for t in texts] == [e.ids for e in tok.encode_batch(texts)]
    assert [hf.decode(e.ids) for e in tok.encode_batch(texts)] == texts
    assert hf.bos_token == "<|begin|>" and hf.convert_tokens_to_ids("<|end|>") == 701
    assert hf.chat_template == "{{ messages[0]['content'] }}" and len(hf) == tok.get_vocab_size()


def test_naive_placement_renumbers_specials_and_the_merge_does_not(tmp_path):
    """DESIGN B3: new ids written after the specials into model.vocab alone move on load."""
    from tokenizers import Tokenizer

    base = make_base(tmp_path / "base")
    doc = json.loads((base / "tokenizer.json").read_text())
    doc["model"]["vocab"]["中文"] = 702
    naive = Tokenizer.from_str(json.dumps(doc))
    # tokenizers 0.23: <|begin|> moves to 701 and <|end|> shares 702 with the new token.
    assert (naive.token_to_id("<|begin|>"), naive.token_to_id("<|end|>")) != (700, 701)


def test_first_new_id(merged, tmp_path):
    base_dir, out, rep, _ = merged
    zh = out.parent / "zh.json"
    with pytest.raises(UserError, match="collides"):
        merge(MergeConfig(base=str(base_dir), add=str(zh), out=str(tmp_path / "low"), first_new_id=701))
    assert not (tmp_path / "low").exists()
    r = merge(MergeConfig(base=str(base_dir), add=str(zh), out=str(tmp_path / "high"), first_new_id=768))
    tok = _load(tmp_path / "high")
    assert r["first_new_id"] == 768 and tok.token_to_id("<|end|>") == 701
    assert min(i for t, i in tok.get_vocab().items() if i > 701) == 768


def test_report_on_bpe(merged, tmp_path):
    base_dir, out, _, _ = merged
    r = report(ReportConfig(tokenizers=[str(base_dir), str(out)], inputs=[str(corpus_path())],
                            json_out=str(tmp_path / "r.json")))
    a, b = r["tokenizers"]
    assert b["tokens_per_char"] < a["tokens_per_char"] and b["round_trip_failures"] == 0
    ext = b["extension_of_first"]
    assert ext["unreachable"] == 0 and ext["base_language_changed"] == {"english": 0, "python": 0, "numbers": 0}
    assert json.loads((tmp_path / "r.json").read_text())["tokenizers"][1]["backend"] == "bpe"


def test_script_rule_fragments():
    rule = ScriptRule("Han")
    zhong = "中".encode()
    assert rule.holds_script(zhong) and rule.holds_script(zhong[:2]) and rule.holds_script("，".encode() + zhong[:2])
    assert not rule.holds_script(zhong[:1])  # E4 also starts Yijing hexagram symbols
    assert not rule.holds_script("—".encode()[:2]) and not rule.holds_script(b"ab") and not rule.holds_script(zhong[1:])
    assert ScriptRule("[\\p{Han}\\p{Bopomofo}]").holds_script("ㄅ".encode())
    with pytest.raises(UserError, match="--script"):
        ScriptRule("[unclosed")


# ---------------------------------------------------------------------------- bad input: one line, nothing written


def test_folder_without_a_tokenizer(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither tokenizer.model nor tokenizer.json"):
        backend.detect(tmp_path / "empty")
    with pytest.raises(UserError, match="neither tokenizer.model nor tokenizer.json"):
        merge(MergeConfig(base=str(tmp_path / "empty"), add=str(tmp_path / "x.json"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_tiktoken_without_known_layout(tmp_path):
    import base64

    f = tmp_path / "ranks.tiktoken"
    f.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    assert backend.detect(f) == "bpe"
    with pytest.raises(UserError, match="no known layout.*--split-pattern"):
        bpe.load(f)


def test_tekken_refused(tmp_path):
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(UserError, match="tekken.json, which is not supported yet"):
        bpe.load(tmp_path)


def test_backends_must_match(merged, tiny_base, tiny_zh_model, tmp_path):
    base_dir, out, _, _ = merged
    with pytest.raises(UserError, match="SentencePiece"):
        merge(MergeConfig(base=str(base_dir), add=str(tiny_zh_model), out=str(tmp_path / "a")))
    with pytest.raises(UserError, match="byte-level BPE"):
        merge(MergeConfig(base=str(tiny_base), add=str(out.parent / "zh.json"), out=str(tmp_path / "b")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert backend.detect(tiny_base) == "sentencepiece" and backend.detect(out) == "bpe"


# ---------------------------------------------------------------------------- preprocessing with the BPE backend


def test_preprocess_with_a_bpe_tokenizer_matches_its_batch_encode(merged, zh_docs, tmp_path):
    from cllama_dist.data import pipeline
    from cllama_dist.data.config import PreprocessConfig
    from cllama_dist.data.encoder import TokenizersEncoder, open_encoder
    from cllama_dist.data.preprocess import Pretraining
    from cllama_dist.data.shards import check_manifest, load_manifest, shard_tokens, verify_shards

    from ..conftest import write_jsonl

    _, out, _, _ = merged
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in zh_docs[:60]])
    assert isinstance(open_encoder(str(out)), TokenizersEncoder)
    cfg = PreprocessConfig(inputs=[str(corpus)], tokenizer=str(out), output=str(tmp_path / "s"), block_size=64,
                           chunk_mb=0.02, shard_size_mb=0.02, validation_fraction=0.0, add_eos=True, workers=1)
    m = pipeline.preprocess(Pretraining(), cfg)
    verify_shards(tmp_path / "s", load_manifest(tmp_path / "s"))
    tok = _load(out)
    fp = m["tokenizer"]
    assert fp["backend"] == "bpe" and fp["bos_id"] == 700 and fp["eos_id"] == 701
    assert fp["sha256"] == backend.fingerprint(out)["sha256"]
    stream = []
    for e in tok.encode_batch(zh_docs[:60], add_special_tokens=False):
        stream += [700] + e.ids + [701]
    got: list[int] = []
    for g in range(m["plan"]["groups"]):
        r = json.loads((tmp_path / "s" / pipeline.GROUPS / f"group-{g:06d}.json").read_text())
        if r["shards"]["train"]:
            got += shard_tokens(tmp_path / "s" / r["shards"]["train"]["file"]).reshape(-1).tolist()
        got += r["remainder"]["train"]["tokens"]
    assert got == stream
    # A trainer whose tokenizer is another backend refuses the shards, naming both.
    sp_like = {k: v for k, v in fp.items() if k != "backend"}
    with pytest.raises(UserError, match="tokenizer backend: shards bpe, tokenizer sentencepiece"):
        check_manifest(load_manifest(tmp_path / "s"), sp_like, 64)


def test_added_vocabulary_of_another_pre_tokenizer_is_refused(merged, tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers

    base_dir, out, _, _ = merged
    # The trained vocabulary, given GPT-2's byte-level regex instead of the base's split pattern.
    zh = Tokenizer.from_file(str(out.parent / "zh.json"))
    zh.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    zh.save(str(tmp_path / "zh_other.json"))
    with pytest.raises(UserError, match="another pre-tokenizer than the base.*retrain it"):
        merge(MergeConfig(base=str(base_dir), add=str(tmp_path / "zh_other.json"), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(merged):
    base_dir, out, _, _ = merged
    before = (out / "tokenizer.json").read_bytes()
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        merge(MergeConfig(base=str(base_dir), add=str(out.parent / "zh.json"), out=str(out)))
    assert (out / "tokenizer.json").read_bytes() == before


def test_fetch_says_what_failed_when_the_registry_is_unreachable(tmp_path, monkeypatch):
    from cllama_dist.tokenizer import fetch

    monkeypatch.setenv("CLLAMA_PYPI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(UserError, match="cannot download the wheel llama-models into .*registry reachable"):
        fetch.member("llama3")
    # A cached wheel is used as it is, without the registry.
    import zipfile

    (tmp_path / "cache").mkdir(exist_ok=True)
    with zipfile.ZipFile(tmp_path / "cache" / "llama_models-0.0.1-py3-none-any.whl", "w") as z:
        z.writestr("llama_models/llama3/tokenizer.model", "aGk= 0\n")
    assert fetch.member("llama3").read_text() == "aGk= 0\n"
