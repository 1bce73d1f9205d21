import json
import random

import pytest
import sentencepiece as spm

from cllama_dist.assets import corpus_path
from cllama_dist.tokenizer.config import TokenizerTrainConfig
from cllama_dist.errors import UserError
from cllama_dist.tokenizer.train import Reservoir, split_sentences, train

from ..conftest import write_jsonl


def test_split_sentences_caps_length_and_keeps_text(zh_docs):
    for doc in zh_docs[:40]:
        parts = list(split_sentences(doc, 50))
        assert all(0 < len(p) <= 50 for p in parts)
        assert "".join(parts) == "".join(line.strip() for line in doc.splitlines())


def test_reservoir_is_bounded_seeded_and_uniform():
    r = Reservoir(100, seed=1)
    for i in range(10_000):
        r.add(str(i))
    assert len(r.items) == 100 and r.seen == 10_000
    again = Reservoir(100, seed=1)
    for i in range(10_000):
        again.add(str(i))
    assert again.items == r.items
    # Uniformity: over many runs, items from each half of the stream are kept about equally often.
    late = 0
    for seed in range(200):
        s = Reservoir(10, seed)
        for i in range(1000):
            s.add(str(i))
        late += sum(int(x) >= 500 for x in s.items)
    assert 0.45 < late / 2000 < 0.55


def test_train_writes_model_vocab_and_report(tmp_path):
    cfg = TokenizerTrainConfig(inputs=[str(corpus_path())], output=str(tmp_path / "zh"), vocab_size=2600,
                               sample_sentences=300, threads=1)
    report = train(cfg)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "zh.model"))
    assert sp.get_piece_size() == 2600
    assert (tmp_path / "zh.vocab").read_text(encoding="utf-8").count("\n") == 2600
    on_disk = json.loads((tmp_path / "zh.report.json").read_text())
    assert on_disk == report
    n_docs = len(corpus_path().read_text(encoding="utf-8").splitlines())
    assert report["documents_seen"] == n_docs
    assert report["sentences_sampled"] == 300 < report["sentences_seen"]
    assert report["characters_seen"] == sum(
        len(json.loads(l)["text"]) for l in corpus_path().read_text(encoding="utf-8").splitlines()
    )
    # Same seed, same pieces and scores (the file itself also records its output path).
    train(TokenizerTrainConfig(**{**cfg.__dict__, "output": str(tmp_path / "again")}))
    again = spm.SentencePieceProcessor(model_file=str(tmp_path / "again.model"))
    assert [(again.id_to_piece(i), again.get_score(i)) for i in range(2600)] == [
        (sp.id_to_piece(i), sp.get_score(i)) for i in range(2600)
    ]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_too_large_vocab_says_the_largest_that_works(tmp_path, model_type):
    docs = [{"text": "".join(random.Random(i).choice("天地玄黄宇宙洪荒日月盈昃") for _ in range(30))} for i in range(50)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = dict(inputs=[str(tmp_path / "c.jsonl")], threads=1, model_type=model_type)
    with pytest.raises(UserError) as exc:
        train(TokenizerTrainConfig(output=str(tmp_path / "big"), vocab_size=50000, **cfg))
    msg = str(exc.value)
    assert "largest that works is" in msg
    largest = int(msg.split("largest that works is ")[1].split()[0])
    train(TokenizerTrainConfig(output=str(tmp_path / "ok"), vocab_size=largest, **cfg))


def test_corpus_without_chinese_is_refused(tmp_path):
    write_jsonl(tmp_path / "en.jsonl", [{"text": f"An English sentence number {i}."} for i in range(20)])
    with pytest.raises(UserError, match="no Chinese text"):
        train(TokenizerTrainConfig(inputs=[str(tmp_path / "en.jsonl")], output=str(tmp_path / "x"), vocab_size=50))


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no usable document"):
        train(TokenizerTrainConfig(inputs=[str(tmp_path / "empty.txt")], output=str(tmp_path / "x"), vocab_size=50))


def test_too_small_vocab_for_the_characters(tmp_path):
    with pytest.raises(UserError, match=r"smaller than the \d+ pieces needed"):
        train(TokenizerTrainConfig(inputs=[str(corpus_path())], output=str(tmp_path / "x"), vocab_size=100))


def test_invalid_config_fails_at_start():
    with pytest.raises(UserError, match="character_coverage"):
        TokenizerTrainConfig(character_coverage=2.0)
