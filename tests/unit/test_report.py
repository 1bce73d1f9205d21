import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from cllama_dist.tokenizer.config import ReportConfig
from cllama_dist.tokenizer.report import format_table, report, unreachable_pieces

from ..conftest import write_jsonl


def _extend(base_path, pieces, out):
    m = pb.ModelProto()
    m.ParseFromString(open(base_path, "rb").read())
    for text in pieces:
        p = m.pieces.add()
        p.piece, p.score = text, 0.0
    out.write_bytes(m.SerializeToString())
    return m


def test_unreachable_definition(tiny_base, tmp_path):
    base = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    n = base.get_piece_size()
    # "QZ" is reachable (Q + Z merge); "QXQXQ" cannot form: no piece covers any pair inside it;
    # "▁QZ" is reachable from "▁" + "QZ".
    m = _extend(tiny_base / "tokenizer.model", ["QZ", "QXQXQ", "▁QZ"], tmp_path / "ext.model")
    assert unreachable_pieces(m, n) == [n + 1]


def test_figures_by_hand(tiny_base, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "QZ QZ 12"}, {"text": "好"}])
    m = _extend(tiny_base / "tokenizer.model", ["QZ", "▁QZ", "12", "QXQXQ"], tmp_path / "ext.model")
    base = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    ext = spm.SentencePieceProcessor(model_file=str(tmp_path / "ext.model"))
    r = report(ReportConfig(tokenizers=[str(tiny_base), str(tmp_path / "ext.model")], inputs=[str(corpus)],
                            json_out=str(tmp_path / "r.json")))
    b, e = r["tokenizers"]
    texts = ["QZ QZ 12", "好"]
    nb = sum(len(base.encode(t)) for t in texts)
    ne = sum(len(ext.encode(t)) for t in texts)
    assert (b["tokens"], e["tokens"], b["characters"]) == (nb, ne, 9)
    assert e["tokens_per_char"] == pytest.approx(ne / 9)
    assert e["reduction_vs_first"] == pytest.approx(nb / ne)
    # 好 is 3 UTF-8 bytes, all byte-fallback in both tokenizers.
    assert b["byte_fallback_share"] == pytest.approx(3 / nb)
    x = e["extension_of_first"]
    assert x["added"] == 4 and x["unreachable"] == 1 and x["unreachable_examples"] == ["QXQXQ"]
    assert x["multi_digit_pieces"] == 1
    assert x["multi_digit_tokens_on_corpus"] == ext.encode("QZ QZ 12", out_type=str).count("12")
    assert x["unused_on_corpus"] == sum(1 for p in ["QZ", "▁QZ", "12", "QXQXQ"]
                                        if p not in ext.encode("QZ QZ 12", out_type=str))
    assert "extension_of_first" not in b
    assert "extends" in format_table(r)
    assert (tmp_path / "r.json").is_file()
