import json
import hashlib

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from cllama_dist.tokenizer.config import MergeConfig
from cllama_dist.errors import UserError
from cllama_dist.tokenizer.merge import merge
from cllama_dist.tokenizer.spm import canonical_sha256


def proto(path):
    m = pb.ModelProto()
    m.ParseFromString(open(path, "rb").read())
    return m


def test_union_is_id_stable(tiny_base, tiny_zh_model, tiny_merged):
    base, add, merged = proto(tiny_base / "tokenizer.model"), proto(tiny_zh_model), proto(tiny_merged / "tokenizer.model")
    n = len(base.pieces)
    for a, b in zip(base.pieces, merged.pieces[:n]):
        assert (a.piece, a.score, a.type) == (b.piece, b.score, b.type)
    have = {p.piece for p in base.pieces}
    expected_new = [p.piece for p in add.pieces if p.piece not in have and p.type == 1]
    assert [p.piece for p in merged.pieces[n:]] == expected_new
    assert all(p.score == 0 and p.type == 1 for p in merged.pieces[n:])
    assert merged.normalizer_spec == base.normalizer_spec
    assert merged.trainer_spec == base.trainer_spec
    report = json.loads((tiny_merged / "merge_report.json").read_text())
    assert report["orig_vocab_size"] == n
    assert report["added"] == len(expected_new)
    assert report["new_vocab_size"] == n + len(expected_new)
    assert report["overlap"] == sum(1 for p in add.pieces if p.piece in have)
    fp = report["fingerprint"]
    # "sha256" hashes what encoding depends on (tests/unit/test_tokenizer_fit.py); the file's own bytes are file_sha256.
    assert fp["file_sha256"] == hashlib.sha256((tiny_merged / "tokenizer.model").read_bytes()).hexdigest()
    assert fp["sha256"] == canonical_sha256(merged) != fp["file_sha256"]
    assert (fp["vocab_size"], fp["unk_id"], fp["bos_id"], fp["eos_id"]) == (n + len(expected_new), 0, 1, 2)


def test_merged_encodes_chinese_shorter(tiny_base, tiny_merged, zh_docs):
    base = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    merged = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    text = zh_docs[:50]
    assert sum(map(len, merged.encode(text))) * 2 < sum(map(len, base.encode(text)))
    # The base's own (English) text is encoded exactly as before.
    english = "Return the number of items in the container, or raise ValueError."
    assert merged.encode(english) == base.encode(english)


def test_hf_folder_matches_sentencepiece(tiny_merged, zh_docs):
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(tiny_merged))
    assert len(tok) == sp.get_piece_size()
    for doc in zh_docs:
        assert tok(doc)["input_ids"] == [sp.bos_id()] + sp.encode(doc)
    # transformers 5's stock SentencePieceBackend (no trust_remote_code) decodes by joining pieces, so it cannot
    # reassemble byte-fallback pieces (the folder's own class can: test_tokenizer_fit); on text without them it
    # decodes like SentencePiece.
    lines = [line for d in zh_docs for line in d.splitlines() if line]
    clean = [t for t in lines if not any(sp.is_byte(i) for i in sp.encode(t))]
    assert clean
    for doc in clean[:20]:
        assert tok.decode(tok(doc)["input_ids"], skip_special_tokens=True) == sp.decode(sp.encode(doc))


def test_options(tiny_base, tiny_zh_model, tmp_path):
    r = merge(MergeConfig(base=str(tiny_base), add=str(tiny_zh_model), out=str(tmp_path / "a"),
                          new_piece_score="below-base", drop_multi_digit=True))
    m = proto(tmp_path / "a" / "tokenizer.model")
    n = r["orig_vocab_size"]
    lowest = min(p.score for p in m.pieces[:n] if p.type == 1)
    scores = [p.score for p in m.pieces[n:]]
    assert all(s < lowest for s in scores) and scores == sorted(scores, reverse=True)
    assert r["added_multi_digit"] == 0


def test_refuses_existing_output(tiny_base, tiny_zh_model, tiny_merged):
    with pytest.raises(UserError, match="--overwrite"):
        merge(MergeConfig(base=str(tiny_base), add=str(tiny_zh_model), out=str(tiny_merged)))


def test_base_that_is_not_sentencepiece(tmp_path, tiny_zh_model):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}}))
    with pytest.raises(UserError, match="JSON file.*not a SentencePiece model"):
        merge(MergeConfig(base=str(tmp_path / "tokenizer.json"), add=str(tiny_zh_model), out=str(tmp_path / "o")))
    (tmp_path / "junk.model").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(UserError, match="not a SentencePiece model"):
        merge(MergeConfig(base=str(tmp_path / "junk.model"), add=str(tiny_zh_model), out=str(tmp_path / "o")))
    (tmp_path / "empty.model").write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        merge(MergeConfig(base=str(tmp_path / "empty.model"), add=str(tiny_zh_model), out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="not found"):
        merge(MergeConfig(base=str(tmp_path / "missing.model"), add=str(tiny_zh_model), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_a_model_cut_short_to_its_pieces_is_refused_not_read_as_a_smaller_vocabulary(tmp_path, tiny_base,
                                                                                      tiny_zh_model, capsys):
    """The specs are written after the pieces: a file cut at a piece boundary still parses, without them."""
    from cllama_dist import cli
    from cllama_dist.tokenizer import spm as spmio

    whole = proto(tiny_zh_model)
    cut = pb.ModelProto()
    cut.pieces.extend(whole.pieces[:1000])
    short = tmp_path / "short.model"
    short.write_bytes(cut.SerializeToString())
    assert spm.SentencePieceProcessor(model_proto=short.read_bytes()).get_piece_size() == 1000  # what was accepted
    for read in (spmio.load_proto, spmio.fingerprint, spmio.processor):  # merge, preprocess, trainer, eval
        with pytest.raises(UserError) as err:
            read(short)
        assert str(err.value) == (f"tokenizer {short} is incomplete: it holds 1,000 pieces but no trainer_spec and "
                                  "no normalizer_spec (a truncated or damaged file?); copy the tokenizer again")
    assert cli.main(["tokenizer", "merge", "--base", str(tiny_base), "--add", str(short), "--out",
                     str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"cllama tokenizer merge: error: tokenizer to add {short} is incomplete: it holds 1,000 "
                           "pieces but no trainer_spec and no normalizer_spec (a truncated or damaged file?); copy the "
                           "tokenizer again")
    assert not (tmp_path / "m").exists()
    whole.ClearField("normalizer_spec")  # cut after the trainer spec
    (tmp_path / "half.model").write_bytes(whole.SerializeToString())
    with pytest.raises(UserError, match=r"holds 3,000 pieces but no normalizer_spec \("):
        spmio.load_proto(tmp_path / "half.model")
