"""The merged tokenizers from the real fixtures (skipped without CLLAMA_FIXTURES): the published file
byte for byte, the canonical fingerprint, the exact fast tokenizer over the whole fixture corpus, and
why the paper's merge can have none."""

import hashlib
import json

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from cllama_dist.assets import corpus_path
from cllama_dist.tokenizer.config import MergeConfig, ReportConfig
from cllama_dist.tokenizer import hf
from cllama_dist.tokenizer.merge import merge
from cllama_dist.tokenizer.report import report
from cllama_dist.tokenizer.spm import fingerprint

PUBLISHED_SHA256 = "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0"
PUBLISHED_BYTES = 757_958
RARE = ["𠀀", "龘", "😀", "𠀀龘😀 人工智能", "鱻麤靐齉"]


def _merge(real_fixtures, out, mode):
    merge(MergeConfig(base=str(real_fixtures / "llama_tokenizer.model"), add=str(real_fixtures / "chinese_sp.model"),
                      out=str(out), new_piece_score=mode))
    return out


@pytest.fixture(scope="module")
def paper(real_fixtures, tmp_path_factory):
    return _merge(real_fixtures, tmp_path_factory.mktemp("paper") / "tok", "paper")


@pytest.fixture(scope="module")
def exact(real_fixtures, tmp_path_factory):
    return _merge(real_fixtures, tmp_path_factory.mktemp("exact") / "tok", "exact")


@pytest.fixture(scope="module")
def docs(real_fixtures):
    fixture = [json.loads(l)["text"] for l in (real_fixtures / "zh_open_mix.jsonl").read_text(encoding="utf-8").splitlines()]
    shipped = [json.loads(l)["text"] for l in corpus_path().read_text(encoding="utf-8").splitlines()]
    assert len(fixture) == 2625
    return fixture + shipped


def test_paper_merge_is_the_published_file(paper):
    data = (paper / "tokenizer.model").read_bytes()
    assert len(data) == PUBLISHED_BYTES
    assert hashlib.sha256(data).hexdigest() == PUBLISHED_SHA256
    assert not (paper / "tokenizer.json").exists()
    assert json.loads((paper / "tokenizer_config.json").read_text())["tokenizer_class"] == "SentencePieceBackend"


def test_fingerprint_of_published_and_typed_files(paper, tmp_path):
    """Our earlier merge set `type` on every appended piece (793,864 bytes): the same model."""
    m = pb.ModelProto()
    m.ParseFromString((paper / "tokenizer.model").read_bytes())
    for p in m.pieces[32000:]:
        p.type = pb.ModelProto.SentencePiece.NORMAL
    typed = tmp_path / "typed.model"
    typed.write_bytes(m.SerializeToString())
    assert typed.stat().st_size == 793_864
    a, b = fingerprint(paper), fingerprint(typed)
    assert a["file_sha256"] == PUBLISHED_SHA256 != b["file_sha256"]
    assert a["sha256"] == b["sha256"]
    assert (a["vocab_size"], a["unk_id"], a["bos_id"], a["eos_id"], a["pad_id"]) == (49953, 0, 1, 2, -1)


def test_exact_fast_tokenizer_equals_sentencepiece(exact, docs):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(exact / "tokenizer.model"))
    fast = Tokenizer.from_file(str(exact / "tokenizer.json"))
    want = sp.encode(docs)
    assert [e.ids for e in fast.encode_batch(docs, add_special_tokens=False)] == want
    tok = AutoTokenizer.from_pretrained(str(exact))
    assert len(tok) == 49953
    assert tok(docs)["input_ids"] == [[1] + ids for ids in want]
    assert tok.batch_decode([[1] + ids for ids in want], skip_special_tokens=True) == sp.decode(want)
    for t in RARE:
        ids = tok(t)["input_ids"]
        assert any(sp.is_byte(i) for i in ids) and tok.decode(ids, skip_special_tokens=True) == t


def test_llama_itself_has_an_exact_fast_tokenizer(real_fixtures, docs):
    """LLaMA's own ties (its 16 whitespace-only pieces at -1e9) are ranked so that runs of spaces match."""
    from tokenizers import Tokenizer

    m = pb.ModelProto()
    m.ParseFromString((real_fixtures / "llama_tokenizer.model").read_bytes())
    assert hf.fast_problems(m) == []
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    fast = Tokenizer.from_str(json.dumps(hf.tokenizer_json(m)))
    spaces = [" " * n + w for n in range(0, 41) for w in ("", "x", "的")] + ["a" + " " * n + "b" for n in range(41)]
    texts = docs + spaces + ["def f():\n" + " " * 8 + "return  1\n"]
    assert [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)] == sp.encode(texts)


def test_exact_against_paper_in_the_report(real_fixtures, paper, exact):
    r = report(ReportConfig(tokenizers=[str(real_fixtures / "llama_tokenizer.model"), str(paper), str(exact)],
                            inputs=[str(real_fixtures / "zh_open_mix.jsonl")]))
    _, p, e = r["tokenizers"]
    assert p["tokens"] == 1_701_866
    assert e["same_pieces_as"] == [{"tokenizer": str(paper), "documents_encoded_differently": 2442}]
    assert e["tokens"] == 1_703_231  # 0.08% more than the paper's: 0.7424 tokens a character vs 0.7418
    assert e["fast_tokenizer_documents_differing"] == 0


def test_no_merges_list_reproduces_the_paper_merge(paper):
    """Two appended pieces "xy" and "yx", both score 0: SentencePiece merges the leftmost pair, so "xyx"
    gives [xy, x] and "yxy" gives [yx, y]. A merges list ranks (x, y) and (y, x) once for all positions:
    whichever comes first, one of the two texts comes out wrong."""
    from tokenizers import Tokenizer, models

    sp = spm.SentencePieceProcessor(model_file=str(paper / "tokenizer.model"))
    vocab = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    new = {sp.id_to_piece(i) for i in range(32000, sp.get_piece_size())}
    xy = next(p for p in sorted(new) if len(p) == 2 and p[0] != p[1] and "▁" not in p and p[::-1] in new
              and p + p[0] not in vocab and p[::-1] + p[1] not in vocab and "▁" + p[0] not in vocab
              and "▁" + p[1] not in vocab)
    x, y = xy
    assert sp.get_score(sp.piece_to_id(xy)) == sp.get_score(sp.piece_to_id(y + x)) == 0
    assert sp.encode(x + y + x, out_type=str) == ["▁", x + y, x]
    assert sp.encode(y + x + y, out_type=str) == ["▁", y + x, y]
    v = {"▁": 0, x: 1, y: 2, x + y: 3, y + x: 4}
    for order in ([(x, y), (y, x)], [(y, x), (x, y)]):
        bpe = Tokenizer(models.BPE(vocab=v, merges=order))
        got = [bpe.encode(t).tokens for t in (x + y + x, y + x + y)]
        assert got != [[x + y, x], [y + x, y]]
