"""The paper's tokenizer, reproduced from the real fixtures (skipped without CLLAMA_FIXTURES)."""

import json

import pytest
import sentencepiece as spm

from cllama_dist.tokenizer.config import MergeConfig, ReportConfig
from cllama_dist.tokenizer.merge import merge
from cllama_dist.tokenizer.report import report

SENTENCE = "人工智能是计算机科学、心理学、哲学等学科融合的交叉学科。"


@pytest.fixture(scope="module")
def paper_merged(real_fixtures, tmp_path_factory):
    out = tmp_path_factory.mktemp("paper") / "merged"
    merge(MergeConfig(base=str(real_fixtures / "llama_tokenizer.model"),
                      add=str(real_fixtures / "chinese_sp.model"), out=str(out)))
    return out


def test_paper_facts(real_fixtures, paper_merged):
    r = json.loads((paper_merged / "merge_report.json").read_text())
    assert (r["new_vocab_size"], r["added"], r["overlap"]) == (49953, 17953, 2047)
    llama = spm.SentencePieceProcessor(model_file=str(real_fixtures / "llama_tokenizer.model"))
    merged = spm.SentencePieceProcessor(model_file=str(paper_merged / "tokenizer.model"))
    assert len(SENTENCE) == 28
    assert len(llama.encode(SENTENCE)) == 35
    assert len(merged.encode(SENTENCE)) == 16
    for i in range(llama.get_piece_size()):
        assert merged.id_to_piece(i) == llama.id_to_piece(i)
        assert merged.get_score(i) == llama.get_score(i)


def test_hf_tokenizer_equals_sentencepiece_on_real_text(real_fixtures, paper_merged):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(paper_merged))
    assert len(tok) == 49953
    sp = spm.SentencePieceProcessor(model_file=str(paper_merged / "tokenizer.model"))
    docs = [json.loads(l)["text"] for l in (real_fixtures / "zh_open_mix.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(docs) == 2625
    mismatched = [i for i, d in enumerate(docs) if tok(d)["input_ids"] != [1] + sp.encode(d)]
    assert mismatched == []


def test_report_figures_on_fixture_corpus(real_fixtures, paper_merged):
    r = report(ReportConfig(tokenizers=[str(real_fixtures / "llama_tokenizer.model"), str(paper_merged)],
                            inputs=[str(real_fixtures / "zh_open_mix.jsonl")]))
    llama, merged = r["tokenizers"]
    assert llama["characters"] == 2_294_261
    assert llama["tokens"] == 3_358_207 and merged["tokens"] == 1_701_866
    assert round(llama["byte_fallback_share"], 3) == 0.496
    assert round(merged["reduction_vs_first"], 2) == 1.97
    assert merged["extension_of_first"]["added"] == 17953
