"""The Hugging Face tokenizer folder around a SentencePiece model, and the exact fast tokenizer.

Two layouts, chosen by whether a merges list can reproduce the model (``fast_problems``):

- *SentencePiece layout* (the paper's merge, any model with tied scores): ``tokenizer.model`` and a
  ``tokenizer_config.json`` naming transformers 5's ``SentencePieceBackend``, which encodes with
  SentencePiece itself, so ids equal SentencePiece's exactly. No ``tokenizer.json`` is written:
  SentencePiece's BPE breaks ties between equal scores by position (the leftmost pair merges first,
  ``SymbolPairComparator`` in sentencepiece/src/bpe_model.cc), while a merges list ranks every pair
  once, for all positions. The paper's merge gives all 17,953 appended pieces score 0, so the two
  disagree on most Chinese documents (all 2,625 fixture documents with transformers 5.24's own
  conversion of tokenizer.model). So the only exact encoder is SentencePiece, and no stock class
  both encodes with it and decodes byte-fallback pieces (5.x's ``SentencePieceBackend`` prints them
  as ``<0xE4>``; 4.x's AutoTokenizer converts to an inexact fast tokenizer): the folder carries
  ``tokenization_cllama.py``, named by ``auto_map``, which AutoTokenizer loads with
  ``trust_remote_code=True`` in both versions (SentencePiece's ids and decode); without it 5.x keeps
  the stock class named by ``tokenizer_class``. What each version does is in ``readme``.
- *Fast layout* (``--new-piece-score exact``, or any model whose competing merges have distinct
  scores): the above plus an exact ``tokenizer.json`` (BPE with merges ranked by the merged piece's
  score, byte fallback, LLaMA's "prepend ▁, spaces to ▁" normalizer, a BOS post-processor) and
  ``tokenizer_class`` ``PreTrainedTokenizerFast``, which transformers 4.x and 5.x (as
  ``TokenizersBackend``) both load from tokenizer.json as it is: SentencePiece's ids, and a ``decode``
  that turns byte-fallback pieces back into characters (the ``ByteFallback`` decoder). Not
  ``LlamaTokenizer``: transformers 5 rebuilds that class's pipeline from the vocabulary and merges
  with its own Metaspace pre-tokenizer, which does not prepend "▁" to text that already starts with
  a space (" a" becomes "▁a", SentencePiece gives "▁", "▁a").

Why a merges list is exact when scores are distinct: SentencePiece's BPE encoder repeatedly merges the
adjacent symbol pair whose concatenation is the highest-scoring piece, ties to the leftmost; the
``tokenizers`` BPE model repeatedly applies the lowest-ranked merge present, ties (the same merge at
several positions) to the leftmost. Ranking every split (a, b) of a piece by that piece's score makes
the two choose the same pair at every step, unless two different pieces with equal scores compete:
the ties ``fast_problems`` looks for. (Two splits of one piece share its score too; they can only
disagree where they overlap, as in "ab"+"a" vs "a"+"ba" inside "aba", and the tests' fuzzing and
overlap cases found no text where it matters.) One family of ties is allowed: LLaMA gives all its
whitespace-only pieces ("▁▁" ... 16 × "▁") the score -1e9, and for a run of spaces SentencePiece then
grows the leftmost run one "▁" at a time; ranking (▁×k, ▁) before (▁×j, ▁) for k > j, and both
before any other split, makes the merges list do exactly that.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import spm as spmio

TOKENIZER_JSON = "tokenizer.json"
CONFIG_JSON = "tokenizer_config.json"
SPECIAL_JSON = "special_tokens_map.json"
README = "TOKENIZER.md"
# The SentencePiece layout's tokenizer code (``auto_map``): SentencePiece's decode behind AutoTokenizer.
CODE = "tokenization_cllama.py"
CODE_CLASS = "tokenization_cllama.CllamaTokenizer"
# Every file a tokenizer folder may hold, for stages that copy one (export, the demo's base model).
FOLDER_FILES = (spmio.MODEL_FILE, CONFIG_JSON, SPECIAL_JSON, TOKENIZER_JSON, README, CODE)
SPACE = "▁"

# Piece types that SentencePiece's BPE may produce by merging (model_interface.cc, InitializePieces:
# NORMAL, USER_DEFINED and UNUSED go to `pieces_`, which MaybeAddNewSymbolPair looks up).
_MERGEABLE = (spmio.NORMAL, spmio.USER_DEFINED, spmio.UNUSED)
_BPE = 2  # TrainerSpec.ModelType


def _whitespace_only(piece: str) -> bool:
    return len(piece) > 1 and set(piece) == {SPACE}


def fast_problems(proto) -> list[str]:
    """Why no ``tokenizers`` BPE pipeline can reproduce this SentencePiece model; empty when one can.

    Checked: the model type and normalizer (only LLaMA's conventions are translated), piece types the
    fast tokenizer cannot express, characters SentencePiece can merge but a fast tokenizer would send
    to byte fallback, and equal scores between different pieces that can compete for a merge.
    """
    problems: list[str] = []
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ts.model_type != _BPE:
        problems.append(f"model type {ts.model_type} is not BPE")
    if ns.precompiled_charsmap:
        problems.append(f"normalizer {ns.name!r} rewrites characters (a precompiled charsmap); only the identity "
                        "normalizer is translated")
    if ns.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if not ns.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    if ts.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    if proto.denormalizer_spec.precompiled_charsmap:
        problems.append("the model has a denormalizer")
    odd = [p.piece for p in proto.pieces if p.type in (spmio.USER_DEFINED, spmio.UNUSED)]
    if odd:
        problems.append(f"{len(odd)} user-defined or unused pieces (e.g. {odd[:3]})")
    if problems:
        return problems

    normal = {p.piece for p in proto.pieces if p.type == spmio.NORMAL}
    foreign = sorted({c for p in normal if len(p) > 1 for c in p if c not in normal})
    if foreign:
        problems.append(f"{len(foreign)} characters occur inside pieces but are not pieces themselves "
                        f"(e.g. {foreign[:5]}): SentencePiece can merge them, a fast tokenizer sends them to bytes")
    # Different multi-character pieces with the same score: SentencePiece breaks their ties by position.
    by_score: dict[float, list[str]] = {}
    for p in proto.pieces:
        if p.type == spmio.NORMAL and len(p.piece) > 1:
            by_score.setdefault(p.score, []).append(p.piece)
    tied = [(s, ps) for s, ps in by_score.items() if len(ps) > 1 and not all(_whitespace_only(x) for x in ps)]
    if tied:
        n = sum(len(ps) for _, ps in tied)
        s, ps = max(tied, key=lambda t: len(t[1]))
        problems.append(f"{n:,} multi-character pieces share their score with another (e.g. {len(ps):,} at {s:g}: "
                        f"{ps[:3]}); SentencePiece breaks such ties by position, which a merges list cannot")
    return problems


def merges(proto) -> list[tuple[str, str]]:
    """Every (a, b) with a, b and a + b mergeable pieces, ranked as SentencePiece's BPE would choose them.

    Rank: the merged piece's score, highest first; within equal scores (only LLaMA's whitespace runs
    when ``fast_problems`` is empty) the longer left part first, so a run of "▁" grows from the left
    the way SentencePiece's leftmost tie-breaking grows it; then the merged piece's id, for a
    deterministic order.
    """
    ids = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in _MERGEABLE}
    ranked = []
    for piece, i in ids.items():
        if len(piece) < 2:
            continue
        score = proto.pieces[i].score
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in ids and b in ids:
                ranked.append((-score, -len(a), i, (a, b)))
    ranked.sort()
    return [pair for *_, pair in ranked]


def tokenizer_json(proto) -> dict:
    """The ``tokenizers`` serialisation (format 1.0) that reproduces ``proto``; check ``fast_problems`` first."""
    pieces = proto.pieces
    special = [(i, p.piece) for i, p in enumerate(pieces) if p.type in (spmio.CONTROL, spmio.UNKNOWN)]
    named = special_tokens(proto)
    unk, bos = named["unk_token"], named.get("bos_token")
    pairs = merges(proto)
    # "a b" strings are read by every tokenizers release; pieces never hold a plain space once
    # escape_whitespaces has turned spaces into "▁" (checked), so the string form is unambiguous.
    spaced = any(" " in a or " " in b for a, b in pairs)
    post = None
    if bos is not None:
        bos_id = next(i for i, p in enumerate(pieces) if p.piece == bos)
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, piece in special
        ],
        # SentencePiece with the identity rule, add_dummy_prefix and escape_whitespaces normalises
        # text to "▁" + text with every " " replaced by "▁" (normalizer.cc). Prepend + Replace does
        # exactly that; a Metaspace pre-tokenizer would not prepend to text that already starts
        # with a space (" a" -> "▁a" instead of SentencePiece's "▁▁a").
        "normalizer": {"type": "Sequence", "normalizers": (
            ([{"type": "Prepend", "prepend": SPACE}] if proto.normalizer_spec.add_dummy_prefix else [])
            + [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
        )},
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": (
            [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
             {"type": "ByteFallback"}, {"type": "Fuse"}]
            + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if proto.normalizer_spec.add_dummy_prefix else [])
        )},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": bool(proto.trainer_spec.byte_fallback),
            "ignore_merges": False,
            "vocab": {p.piece: i for i, p in enumerate(pieces)},
            "merges": [[a, b] for a, b in pairs] if spaced else [f"{a} {b}" for a, b in pairs],
        },
    }


def special_tokens(proto) -> dict[str, str]:
    """unk/bos/eos/pad token strings as SentencePiece resolves them (by piece name and type, not trainer ids)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    found = {"unk_token": sp.unk_id(), "bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "pad_token": sp.pad_id()}
    return {k: sp.id_to_piece(i) for k, i in found.items() if i >= 0}


def tokenizer_config(proto, fast: bool) -> dict:
    """tokenizer_config.json for either layout (see the module docstring)."""
    special = special_tokens(proto)
    common = {
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000,
        **special,
    }
    if fast:
        # The generic fast class: transformers 4.x and 5.x both load tokenizer.json as it is. With
        # "LlamaTokenizer", 5.x would rebuild the pipeline from the vocabulary and merges with its own
        # Metaspace pre-tokenizer, which does not prepend "▁" to text that starts with a space.
        # BOS comes from tokenizer.json's post-processor (LLaMA's convention: BOS, no EOS).
        return {"tokenizer_class": "PreTrainedTokenizerFast", **common}
    return {
        "tokenizer_class": "SentencePieceBackend",
        "backend": "sentencepiece",
        # LLaMA's convention: BOS before every sequence, no EOS.
        "special_tokens_pattern": "bos",
        "legacy": True,  # encode with SentencePiece as it is (dummy prefix included), like the original
        # null, neither true nor false, for its two readers. transformers 4.x's slow LlamaTokenizer (the way 4.x
        # loads this layout) tests it for truth: on, decode strips the first piece's "▁" and SentencePiece then
        # strips the next one, so a text that starts with a space loses it. llama.cpp's converter
        # (convert_hf_to_gguf.py) writes any non-null value into the GGUF as add_space_prefix, over the
        # SentencePiece model's add_dummy_prefix: false there drops the dummy prefix, and every text's ids differ
        # from SentencePiece's from the first token (bench/llamacpp/check.py found it). SentencePiece's own dummy
        # prefix is unaffected either way (legacy mode).
        "add_prefix_space": None,
        # With trust_remote_code=True, AutoTokenizer in 4.x and 5.x loads tokenization_cllama.py's class:
        # the same SentencePiece encoding, and SentencePiece's decode (byte-fallback pieces become the
        # characters they spell; the stock 5.x class prints "<0xE4>"). [slow, fast]: there is no fast one.
        # Without it, 5.x keeps the stock class named above and 4.x asks for trust_remote_code.
        "auto_map": {"AutoTokenizer": [CODE_CLASS, None]},
        **common,
    }


# Texts on which the fast tokenizer is checked against SentencePiece when it is written: the edges
# where a pipeline most easily drifts (leading, repeated and trailing spaces, tabs and newlines, digits,
# characters that fall back to bytes, literal "▁"), plus the shipped Chinese corpus.
EDGE_TEXTS = ["", " ", "  ", " a", "  a", "a ", "a  b   c", "\t\n", "x\n\ny", " " * 40 + "z", "123 4567 ８９",
              "𠀀", "龘", "😀 🤗", "▁", "▁▁a", "人工智能是计算机科学的一个分支。", "Hello, world!"]


def check_fast(proto, tok_json: dict, texts: list[str]) -> list[int] | None:
    """Indices of ``texts`` that the fast tokenizer encodes differently from SentencePiece.

    Needs the ``tokenizers`` library (a dependency of transformers); without it nothing is checked
    and ``None`` is returned.
    """
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    fast = Tokenizer.from_str(json.dumps(tok_json, ensure_ascii=False))
    want = sp.encode(texts)
    got = [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    return [i for i, (a, b) in enumerate(zip(want, got)) if a != b]


def _shipped_texts() -> list[str]:
    from ..assets import corpus_path

    return [json.loads(line)["text"] for line in corpus_path().read_text(encoding="utf-8").splitlines() if line]


def write_folder(out: str | Path, model_bytes: bytes, proto, fast: bool | str = False) -> dict:
    """Write a Hugging Face tokenizer folder around a SentencePiece model: tokenizer.model,
    tokenizer_config.json, special_tokens_map.json, TOKENIZER.md and, for the fast layout, tokenizer.json
    (for the SentencePiece layout, tokenization_cllama.py).
    Returns {"layout", "fast_problems", "files"}.

    ``fast``: False: SentencePiece layout; True: fast layout, a UserError naming the reasons when the
    model cannot have an exact tokenizer.json; "auto": fast layout exactly when it can. A written
    tokenizer.json is checked against SentencePiece on ``EDGE_TEXTS`` and the shipped corpus; a
    difference is a bug and raises RuntimeError.
    """
    from ..errors import UserError

    out = Path(out)
    problems = fast_problems(proto)
    if fast is True and problems:
        raise UserError("no exact fast tokenizer (tokenizer.json) is possible for this model: " + "; ".join(problems))
    use_fast = bool(fast) and not problems
    out.mkdir(parents=True, exist_ok=True)
    (out / spmio.MODEL_FILE).write_bytes(model_bytes)
    files = [spmio.MODEL_FILE, CONFIG_JSON, SPECIAL_JSON, README]
    if use_fast:
        tj = tokenizer_json(proto)
        texts = EDGE_TEXTS + _shipped_texts()
        bad = check_fast(proto, tj, texts)
        if bad:
            raise RuntimeError(f"the fast tokenizer disagrees with SentencePiece on {len(bad)} check texts "
                               f"(first: {texts[bad[0]][:60]!r}); this is a bug")
        (out / TOKENIZER_JSON).write_text(json.dumps(tj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        files.append(TOKENIZER_JSON)
    else:
        (out / CODE).write_bytes((Path(__file__).parent / CODE).read_bytes())
        files.append(CODE)
    # A stale file of the other layout: a tokenizer.json would be loaded instead of SentencePiece; the
    # fast layout names no code.
    stale = CODE if use_fast else TOKENIZER_JSON
    if (out / stale).exists():
        (out / stale).unlink()
    (out / CONFIG_JSON).write_text(json.dumps(tokenizer_config(proto, use_fast), indent=2, ensure_ascii=False) + "\n")
    (out / SPECIAL_JSON).write_text(json.dumps(special_tokens(proto), indent=2, ensure_ascii=False) + "\n")
    (out / README).write_text(readme(proto, use_fast, problems), encoding="utf-8")
    return {"layout": "fast" if use_fast else "sentencepiece", "fast_problems": problems, "files": files}


def readme(proto, use_fast: bool, problems: list[str]) -> str:
    """TOKENIZER.md: how to load this folder, and why it is laid out this way."""
    n = len(proto.pieces)
    head = (f"# Tokenizer: {n:,} SentencePiece pieces (cllama-dist)\n\n"
            "`tokenizer.model` is the reference: `sentencepiece.SentencePieceProcessor(model_file=\"tokenizer.model\")`.\n"
            "Hugging Face tokenizers from this folder add BOS (`<s>`) before each text and no EOS, as LLaMA's do. "
            "They read literal special-token text in the input (`<s>`, `</s>`) as the special token, where "
            "SentencePiece reads it as text; pass `split_special_tokens=True` to get SentencePiece's ids for it "
            "too (checked with transformers 4.57 and 5.24).\n\n")
    if use_fast:
        return head + (
            "## Loading\n\n"
            "`AutoTokenizer.from_pretrained(DIR)` loads `tokenizer.json` with transformers 4.x "
            "(`PreTrainedTokenizerFast`) and 5.x (`TokenizersBackend`). Its BPE merges are ranked by the "
            "pieces' scores, which are all distinct where pieces compete, so it encodes every text to "
            "SentencePiece's ids, and `decode` turns byte-fallback pieces back into characters. One "
            "difference remains in decoding: a run of byte pieces that is not valid UTF-8 (a generation cut "
            "inside a character) decodes to one U+FFFD per byte, where SentencePiece keeps the run's valid "
            "characters.\n")
    why = "\n".join(f"- {p}" for p in problems) or "- (none recorded)"
    return head + (
        "## Loading\n\n"
        "`AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)`, in transformers 4.x and 5.x, loads the "
        f"class in `{CODE}` (this folder's `auto_map`): ids identical to SentencePiece's (it encodes with "
        "SentencePiece itself, BOS in front, no EOS), and a `decode` that is SentencePiece's, so "
        "byte-fallback pieces come back as the characters they spell. It is transformers 5's "
        "`SentencePieceBackend`, or 4.x's slow `LlamaTokenizer`, with two methods changed: text between "
        "special tokens is decoded by SentencePiece, and `save_pretrained` writes a folder that loads the same way "
        "again (4.x warns, as expected, that the class it loads is not the `tokenizer_class` named, which stays "
        "the stock one for loading without `trust_remote_code`). Neither version has a stock class that does both (checked "
        "with transformers 5.24 and 4.57); hence the file, which imports nothing but transformers.\n\n"
        "Without `trust_remote_code`:\n\n"
        "- transformers 5.x gives its stock `SentencePieceBackend`: the same ids, but its `decode` joins piece "
        "strings, so byte-fallback pieces come out as `<0xE4><0xB8>...` instead of the character (transformers "
        "issue #47473; still so in 5.25). Decode with `tok.sp_model.decode(ids)` or SentencePiece then.\n"
        "- transformers 4.x refuses the folder, asking for `trust_remote_code=True`: its stock choice for a "
        "SentencePiece folder is a fast tokenizer converted from `tokenizer.model`, which encodes this model "
        "differently (below). `LlamaTokenizer.from_pretrained(DIR)` (4.x only: in 5.x that class is the "
        "converted fast one) is SentencePiece too.\n\n"
        "## Why there is no tokenizer.json\n\n"
        "A fast (`tokenizers`) BPE ranks each merge once, for every position; SentencePiece's BPE picks the "
        "highest-scoring piece and breaks ties by position (leftmost first). Why a merges list cannot "
        "reproduce this model:\n\n"
        f"{why}\n\n"
        "`cllama tokenizer merge --new-piece-score exact` gives the appended pieces distinct scores, and "
        "writes an exact tokenizer.json that both transformers versions load (its encodings differ from "
        "this model's; `cllama tokenizer report` counts how much).\n")
