"""The merged tokenizer as every consumer sees it: the canonical fingerprint, the exact fast tokenizer,
the two Hugging Face folder layouts, and decoding of byte-fallback pieces.

References are independent of the code under test: SentencePiece itself (encode/decode), the
`tokenizers` library loading the written tokenizer.json, and transformers' AutoTokenizer.
"""

import hashlib
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from cllama_dist.tokenizer.config import MergeConfig, ReportConfig
from cllama_dist.tokenizer import hf
from cllama_dist.tokenizer.base import build_base_tokenizer
from cllama_dist.tokenizer.merge import merge
from cllama_dist.tokenizer.report import report
from cllama_dist.tokenizer.spm import canonical_sha256, fingerprint

from ..conftest import write_jsonl

RARE = ["𠀀", "龘", "😀 表情", "𠀀龘😀 人工智能", "Ünïcödé ½", "\t制表符\n换行"]
ENGLISH = ["Return the number of items in the container, or raise ValueError.", "  two leading spaces",
           "trailing  ", "digits 1234567 and ８９"]


def proto_of(path):
    m = pb.ModelProto()
    m.ParseFromString(open(path, "rb").read())
    return m


def sp_of(m):
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


def save(m, path):
    path.write_bytes(m.SerializeToString())
    return path


@pytest.fixture(scope="module")
def exact_merged(tmp_path_factory, tiny_base, tiny_zh_model):
    out = tmp_path_factory.mktemp("exact") / "tok"
    merge(MergeConfig(base=str(tiny_base), add=str(tiny_zh_model), out=str(out), new_piece_score="exact"))
    return out


@pytest.fixture(scope="module")
def texts(zh_docs):
    lines = [line for d in zh_docs for line in d.splitlines() if line]
    return zh_docs + lines[:200] + RARE + ENGLISH + hf.EDGE_TEXTS


# --------------------------------------------------------------------------------------------------
# The fingerprint.


def test_fingerprint_ignores_serialisation_and_training_only_fields(tiny_merged, tmp_path):
    original = proto_of(tiny_merged / "tokenizer.model")
    n_base = json.loads((tiny_merged / "merge_report.json").read_text())["orig_vocab_size"]
    # The same pieces with `type` explicitly set, as the merge used to write them: other bytes, same model.
    typed = pb.ModelProto()
    typed.CopyFrom(original)
    for p in typed.pieces[n_base:]:
        p.type = pb.ModelProto.SentencePiece.NORMAL
    a, b = save(original, tmp_path / "a.model"), save(typed, tmp_path / "b.model")
    assert b.stat().st_size == a.stat().st_size + 2 * (len(original.pieces) - n_base)
    fa, fb = fingerprint(a), fingerprint(b)
    assert fa["file_sha256"] == hashlib.sha256(a.read_bytes()).hexdigest() != fb["file_sha256"]
    assert fa["sha256"] == fb["sha256"] == canonical_sha256(original)
    assert fa["fingerprint_version"] == 1
    assert {k: fa[k] for k in ("vocab_size", "unk_id", "bos_id", "eos_id", "pad_id")} == \
           {k: fb[k] for k in ("vocab_size", "unk_id", "bos_id", "eos_id", "pad_id")}
    # Paths and other trainer-only settings change the bytes, not the fingerprint.
    moved = pb.ModelProto()
    moved.CopyFrom(original)
    moved.trainer_spec.model_prefix = "/somewhere/else/model"
    moved.trainer_spec.input[:] = ["/data/a.txt", "/data/b.txt"]
    moved.trainer_spec.num_threads = 64
    c = save(moved, tmp_path / "c.model")
    assert fingerprint(c)["sha256"] == fa["sha256"] and fingerprint(c)["file_sha256"] != fa["file_sha256"]


def test_fingerprint_stable_across_builds(tiny_base, tmp_path):
    """Two builds of the same base in different folders: trainer_spec.model_prefix differs, the model does not."""
    again = build_base_tokenizer(tmp_path / "elsewhere", vocab_size=1000)
    a, b = proto_of(tiny_base / "tokenizer.model"), proto_of(again)
    assert a.trainer_spec.model_prefix != b.trainer_spec.model_prefix
    assert (tiny_base / "tokenizer.model").read_bytes() != again.read_bytes()
    assert fingerprint(tiny_base)["sha256"] == fingerprint(again)["sha256"]


# Flips of trainer/normalizer fields SentencePiece only reads when training: the installed
# sentencepiece must encode exactly as before, and the fingerprint must not move.
TRAINING_ONLY = {
    "max_sentencepiece_length": lambda m: setattr(m.trainer_spec, "max_sentencepiece_length", 2),
    "split_digits": lambda m: setattr(m.trainer_spec, "split_digits", not m.trainer_spec.split_digits),
    "split_by_whitespace": lambda m: setattr(m.trainer_spec, "split_by_whitespace", not m.trainer_spec.split_by_whitespace),
    "split_by_unicode_script": lambda m: setattr(m.trainer_spec, "split_by_unicode_script",
                                                 not m.trainer_spec.split_by_unicode_script),
    "split_by_number": lambda m: setattr(m.trainer_spec, "split_by_number", not m.trainer_spec.split_by_number),
    "allow_whitespace_only_pieces": lambda m: setattr(m.trainer_spec, "allow_whitespace_only_pieces",
                                                      not m.trainer_spec.allow_whitespace_only_pieces),
    "vocab_size": lambda m: setattr(m.trainer_spec, "vocab_size", 7),
    "character_coverage": lambda m: setattr(m.trainer_spec, "character_coverage", 0.5),
    "unk/bos/eos ids": lambda m: (setattr(m.trainer_spec, "unk_id", 5), setattr(m.trainer_spec, "bos_id", 6),
                                  setattr(m.trainer_spec, "eos_id", 7)),
    "required_chars": lambda m: setattr(m.trainer_spec, "required_chars", "abc"),
    "model_prefix, input, num_threads": lambda m: (setattr(m.trainer_spec, "model_prefix", "/else/where"),
                                                  m.trainer_spec.input.append("/data/x.txt"),
                                                  setattr(m.trainer_spec, "num_threads", 99)),
    "seed_sentencepiece_size": lambda m: setattr(m.trainer_spec, "seed_sentencepiece_size", 17),
    "pretokenization_delimiter": lambda m: setattr(m.trainer_spec, "pretokenization_delimiter", "|"),
    "hard_vocab_limit, use_all_vocab": lambda m: (setattr(m.trainer_spec, "hard_vocab_limit", False),
                                                  setattr(m.trainer_spec, "use_all_vocab", True)),
    "vocabulary_output_piece_score": lambda m: setattr(m.trainer_spec, "vocabulary_output_piece_score", False),
    "user_defined/control symbol lists": lambda m: (m.trainer_spec.user_defined_symbols.append("的"),
                                                    m.trainer_spec.control_symbols.append("<ctl>")),
    "normalizer name": lambda m: setattr(m.normalizer_spec, "name", "nmt_nfkc"),
    "normalization_rule_tsv": lambda m: setattr(m.normalizer_spec, "normalization_rule_tsv", "41\t42"),
}
# Flips of what encoding or decoding reads: the fingerprint must move, and SentencePiece must behave
# differently (ids, special ids, or decoded text).
def _raise_one_score(m):
    """Give one appended piece "bc" a score above its tied neighbours; "abc" with "ab" a piece then changes."""
    two = {p.piece: i for i, p in enumerate(m.pieces) if p.type == 1 and len(p.piece) == 2 and p.score == 0}
    ab, bc = next((x, y) for x in two for y in two if x[1] == y[0] and x[0] + y not in two)
    m.pieces[two[bc]].score = 1.0
    return [ab + bc[1]]


def _retype_one_piece(m):
    """Make a piece that encodes its own text CONTROL: SentencePiece can no longer emit it."""
    sp = sp_of(m)
    i = next(i for i in range(len(m.pieces) - 1, 0, -1)
             if len(m.pieces[i].piece) > 1 and sp.encode(m.pieces[i].piece.replace("▁", " ").lstrip()) == [i])
    m.pieces[i].type = pb.ModelProto.SentencePiece.CONTROL
    return [m.pieces[i].piece.replace("▁", " ").lstrip()]


ENCODING = {
    "one piece's score": _raise_one_score,
    "one piece's type": _retype_one_piece,
    "add_dummy_prefix": lambda m: setattr(m.normalizer_spec, "add_dummy_prefix", not m.normalizer_spec.add_dummy_prefix),
    "remove_extra_whitespaces": lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces",
                                                  not m.normalizer_spec.remove_extra_whitespaces),
    "escape_whitespaces": lambda m: setattr(m.normalizer_spec, "escape_whitespaces", not m.normalizer_spec.escape_whitespaces),
    "treat_whitespace_as_suffix": lambda m: setattr(m.trainer_spec, "treat_whitespace_as_suffix", True),
    "model_type": lambda m: setattr(m.trainer_spec, "model_type", pb.TrainerSpec.UNIGRAM),
    "bos_piece": lambda m: setattr(m.trainer_spec, "bos_piece", "<nope>"),
    "unk_surface": lambda m: setattr(m.trainer_spec, "unk_surface", "[?]"),
}


def _behaviour(m, texts):
    sp = sp_of(m)
    return (sp.encode(texts), sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.decode([sp.unk_id(), 100, 200]))


@pytest.mark.parametrize("field", sorted(TRAINING_ONLY))
def test_training_only_fields(tiny_merged, texts, field):
    original = proto_of(tiny_merged / "tokenizer.model")
    flipped = pb.ModelProto()
    flipped.CopyFrom(original)
    TRAINING_ONLY[field](flipped)
    assert flipped.SerializeToString() != original.SerializeToString()
    assert _behaviour(flipped, texts) == _behaviour(original, texts)
    assert canonical_sha256(flipped) == canonical_sha256(original)


@pytest.mark.parametrize("field", sorted(ENCODING))
def test_encoding_fields(tiny_merged, texts, field):
    original = proto_of(tiny_merged / "tokenizer.model")
    flipped = pb.ModelProto()
    flipped.CopyFrom(original)
    extra = ENCODING[field](flipped)
    assert canonical_sha256(flipped) != canonical_sha256(original)
    probe = texts + ["a  b", "  lead", flipped.pieces[-1].piece.replace("▁", " ") + "x"] + (extra or [])
    assert _behaviour(flipped, probe) != _behaviour(original, probe)


def test_byte_fallback_is_fingerprinted(tiny_merged):
    # Without byte_fallback SentencePiece refuses a model holding byte pieces, so compare the hashes only.
    m = proto_of(tiny_merged / "tokenizer.model")
    before = canonical_sha256(m)
    m.trainer_spec.byte_fallback = False
    assert canonical_sha256(m) != before


# --------------------------------------------------------------------------------------------------
# Merge modes.


def test_paper_mode_writes_pieces_without_type(tiny_base, tiny_zh_model, tiny_merged):
    """The appended pieces carry only piece and score, like the paper's script (no serialised type field)."""
    base, add, merged = (proto_of(tiny_base / "tokenizer.model"), proto_of(tiny_zh_model),
                         proto_of(tiny_merged / "tokenizer.model"))
    n = len(base.pieces)
    for p in merged.pieces[n:]:
        assert not p.HasField("type") and p.HasField("score") and p.score == 0.0
    # Independent reconstruction: base bytes + one serialised `pieces` entry (field 1) per new piece.
    new = [p.piece for p in merged.pieces[n:]]
    assert new == [p.piece for p in add.pieces if p.piece not in {q.piece for q in base.pieces} and p.type in (1, 4)]
    ref = pb.ModelProto()
    ref.CopyFrom(base)
    for piece in new:
        q = ref.pieces.add()
        q.piece, q.score = piece, 0.0
    assert (tiny_merged / "tokenizer.model").read_bytes() == ref.SerializeToString()
    assert not (tiny_merged / "tokenizer.json").exists()
    config = json.loads((tiny_merged / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "SentencePieceBackend"
    report_ = json.loads((tiny_merged / "merge_report.json").read_text())
    assert report_["hf_folder"]["layout"] == "sentencepiece"
    assert any("share their score" in p for p in report_["hf_folder"]["fast_problems"])
    assert "no tokenizer.json" in (tiny_merged / "TOKENIZER.md").read_text()


def test_exact_mode_scores(tiny_base, tiny_merged, exact_merged):
    base = proto_of(tiny_base / "tokenizer.model")
    paper, exact = proto_of(tiny_merged / "tokenizer.model"), proto_of(exact_merged / "tokenizer.model")
    n = len(base.pieces)
    assert [p.piece for p in exact.pieces] == [p.piece for p in paper.pieces]
    for a, b in zip(base.pieces, exact.pieces[:n]):
        assert (a.piece, a.score, a.type) == (b.piece, b.score, b.type)
    scores = [p.score for p in exact.pieces[n:]]
    top = max(p.score for p in base.pieces if p.type == 1)
    assert all(s > top for s in scores)
    assert all(a > b for a, b in zip(scores, scores[1:]))  # distinct, in the added model's order
    assert hf.fast_problems(exact) == []
    assert json.loads((exact_merged / "merge_report.json").read_text())["hf_folder"]["layout"] == "fast"


def test_below_base_scores_are_distinct_float32(tmp_path, tiny_base, tiny_zh_model):
    """LLaMA's lowest score is -1e9 (its whitespace pieces), where float32 cannot tell -1e9 - k from -1e9."""
    base = proto_of(tiny_base / "tokenizer.model")
    i = next(i for i, p in enumerate(base.pieces) if p.type == 1 and len(p.piece) > 1)
    base.pieces[i].score = -1e9
    save(base, tmp_path / "base.model")
    r = merge(MergeConfig(base=str(tmp_path / "base.model"), add=str(tiny_zh_model), out=str(tmp_path / "o"),
                          new_piece_score="below-base"))
    scores = [p.score for p in proto_of(tmp_path / "o" / "tokenizer.model").pieces[len(base.pieces):]]
    assert len(scores) == r["added"] > 1000
    assert scores[0] < -1e9 and all(a > b for a, b in zip(scores, scores[1:]))


# --------------------------------------------------------------------------------------------------
# The fast tokenizer and the folders as transformers loads them.


def test_exact_tokenizer_json_equals_sentencepiece(exact_merged, texts):
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(exact_merged / "tokenizer.model"))
    fast = Tokenizer.from_file(str(exact_merged / "tokenizer.json"))
    assert fast.get_vocab_size() == sp.get_piece_size()
    assert [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)] == sp.encode(texts)
    # Random strings made of pieces, spaces and characters that fall back to bytes.
    rng = random.Random(0)
    pieces = [sp.id_to_piece(i).replace("▁", " ") for i in range(sp.get_piece_size())
              if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))]
    extra = [" ", "  ", "\n", "𠀀", "😀", "\u3000", "1"]
    fuzz = ["".join(rng.choice(pieces) if rng.random() < 0.85 else rng.choice(extra) for _ in range(rng.randint(1, 12)))
            for _ in range(20000)]
    assert [e.ids for e in fast.encode_batch(fuzz, add_special_tokens=False)] == sp.encode(fuzz)


def test_tied_scores_are_refused_for_a_fast_tokenizer(tiny_merged):
    m = proto_of(tiny_merged / "tokenizer.model")
    problems = hf.fast_problems(m)
    assert len(problems) == 1 and "share their score" in problems[0]
    m.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    assert any("not BPE" in p for p in hf.fast_problems(m))


def test_exact_folder_with_transformers(exact_merged, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(exact_merged))
    sp = spm.SentencePieceProcessor(model_file=str(exact_merged / "tokenizer.model"))
    assert len(tok) == sp.get_piece_size()
    for t in texts:
        ids = tok(t)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(t), t
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(t)), t
    # Characters outside the vocabulary fall back to bytes, and decode back to themselves.
    for t in RARE:
        assert any(sp.is_byte(i) for i in sp.encode(t))
        assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t


def test_paper_folder_with_transformers(tiny_merged, texts):
    """The folder's class (auto_map, trust_remote_code=True): SentencePiece's ids and decode, byte-fallback
    pieces as characters. Without trust_remote_code, transformers 5's stock SentencePieceBackend: the same
    ids, and a decode that leaves byte pieces as "<0x..>" text, which TOKENIZER.md says."""
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    config = json.loads((tiny_merged / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_cllama.CllamaTokenizer", None]}
    assert (tiny_merged / "tokenization_cllama.py").read_bytes() == \
        (Path(hf.__file__).parent / "tokenization_cllama.py").read_bytes()
    tok = AutoTokenizer.from_pretrained(str(tiny_merged), trust_remote_code=True)
    assert type(tok).__module__.endswith(".tokenization_cllama") and len(tok) == sp.get_piece_size()
    bytes_seen = 0
    for t in texts:
        ids = tok(t)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(t), t
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(ids[1:]), t
        bytes_seen += any(sp.is_byte(i) for i in ids)
    assert bytes_seen >= len(RARE)
    for t in RARE:
        assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t
    # Special tokens kept: their text in place; without it, SentencePiece's decode of the whole sequence
    # (the space after "</s>" kept, the dummy prefix dropped at the start only).
    a, b = sp.encode("龘 人工智能"), sp.encode(" 开头有空格")
    full = [sp.bos_id()] + a + [sp.eos_id()] + b
    got = tok.decode(full)
    assert got.startswith("<s>") and got.replace("<s>", "").replace("</s>", "") == sp.decode(full), got
    assert got == "<s>龘 人工智能</s>  开头有空格", got  # the text's dummy prefix "▁" shows after "</s>"
    # Streaming decoders (vLLM, TextStreamer) call convert_tokens_to_string on piece lists.
    assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(sp.encode("龘"))) == "龘"

    stock = AutoTokenizer.from_pretrained(str(tiny_merged))
    assert type(stock).__module__.startswith("transformers.") and type(stock).__name__ == "SentencePieceBackend"
    for t in texts:
        assert stock(t)["input_ids"] == [sp.bos_id()] + sp.encode(t)
    misread = stock.decode(stock("龘")["input_ids"], skip_special_tokens=True)
    if misread != "龘":
        assert misread.startswith("<0x"), misread
        assert "<0x" in (tiny_merged / "TOKENIZER.md").read_text()


def _byte_fallback_decode(sp, ids):
    """What tokenizers' Replace/ByteFallback/Fuse/Strip decoder is documented to do: a run of byte pieces
    becomes its UTF-8 text, or one U+FFFD per byte when the run is not valid UTF-8."""
    out, run = [], b""
    for i in ids + [None]:
        if i is not None and sp.is_byte(i):
            run += bytes([int(sp.id_to_piece(i)[3:5], 16)])
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
            run = b""
        if i is not None:
            out.append(sp.id_to_piece(i).replace("▁", " "))
    text = "".join(out)
    return text[1:] if text.startswith(" ") else text


def test_decode_of_generated_ids(exact_merged):
    """Ids as an untrained model samples them (the demo's generations), byte-fallback runs included,
    some cut short. Where every run is valid UTF-8 the stock decode equals SentencePiece's; in an
    invalid run it gives one U+FFFD per byte, where SentencePiece keeps the run's valid characters."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(exact_merged))
    sp = spm.SentencePieceProcessor(model_file=str(exact_merged / "tokenizer.model"))
    rng = random.Random(1)
    normal = [i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    valid = invalid = 0
    for _ in range(300):
        ids = []
        for _ in range(32):
            if rng.random() < 0.2:
                b = rng.choice(["龘", "😀", "𠀀", "é"]).encode("utf-8")
                b = b[: rng.randint(1, len(b))] if rng.random() < 0.05 else b
                ids += [sp.piece_to_id(f"<0x{x:02X}>") for x in b]
            else:
                ids.append(rng.choice(normal))
        ours = tok.decode(ids, skip_special_tokens=True)
        if "\ufffd" not in sp.decode(ids):
            valid += 1
            assert ours == sp.decode(ids)
        else:
            invalid += 1
            assert ours == _byte_fallback_decode(sp, ids)
    assert valid > 150 and invalid > 20


# --------------------------------------------------------------------------------------------------
# The report, given both merges.


def test_report_compares_paper_and_exact(tiny_base, tiny_merged, exact_merged, zh_docs, tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in zh_docs])
    r = report(ReportConfig(tokenizers=[str(tiny_base), str(tiny_merged), str(exact_merged)], inputs=[str(corpus)]))
    base, paper, exact = r["tokenizers"]
    sp_paper = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    sp_exact = spm.SentencePieceProcessor(model_file=str(exact_merged / "tokenizer.model"))
    differing = sum(1 for t in zh_docs if sp_paper.encode(t) != sp_exact.encode(t))
    assert exact["same_pieces_as"] == [{"tokenizer": str(tiny_merged), "documents_encoded_differently": differing}]
    assert "same_pieces_as" not in paper and "same_pieces_as" not in base
    assert exact["fast_tokenizer_documents_differing"] == 0
    assert "fast_tokenizer_documents_differing" not in paper
    assert exact["tokens"] == sum(len(sp_exact.encode(t)) for t in zh_docs)


def test_exact_mode_needs_a_llama_like_base(tiny_zh_model, tiny_base, tmp_path):
    from cllama_dist.errors import UserError

    with pytest.raises(UserError, match="'exact' with base .*zh.model: no exact fast tokenizer.*remove_extra_whitespaces"):
        merge(MergeConfig(base=str(tiny_zh_model), add=str(tiny_base / "tokenizer.model"), out=str(tmp_path / "o"),
                          new_piece_score="exact"))
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="new_piece_score: .zero. is not one of .paper., .exact., .below-base."):
        merge(MergeConfig(base=str(tiny_base), add=str(tiny_zh_model), out=str(tmp_path / "o"), new_piece_score="zero"))
