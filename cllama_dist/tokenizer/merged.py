"""The merged tokenizer as the trainer sees it: its fingerprint, the base vocabulary it extends, and how the
base tokenizer spells each appended piece (for the ``subword`` initialisation of new rows)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import backend, spm


@dataclass(frozen=True)
class MergedVocab:
    path: str
    fingerprint: dict
    orig_vocab: int  # V: len(base tokenizer), the rows that stay frozen (the model may hold more: padding)
    new_vocab: int   # V' = len(tokenizer)
    report: dict = field(default_factory=dict)  # merge_report.json, when the folder has one


def read_merged(path: str, model_vocab: int, extended_vocab: int = 0) -> MergedVocab:
    """Read the merged tokenizer folder; ``model_vocab`` is the base model's vocabulary size (used when the
    folder has no merge report); ``extended_vocab`` (if set) must equal len(tokenizer)."""
    if not path:
        raise UserError("model.tokenizer is required: the merged tokenizer folder")
    fp = backend.fingerprint(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    report_path = folder / "merge_report.json"
    report = {}
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{report_path} is corrupt (not valid JSON: {exc})") from None
    # The base tokenizer's length from the merge report; without one, the model's rows (a base without padding).
    orig = report.get("base", {}).get("vocab_size", model_vocab)
    # len(tokenizer), the pieces of the merged model, not transformers' tokenizer.vocab_size (docs/hazards.md#h2).
    if extended_vocab and extended_vocab != fp["vocab_size"]:
        raise UserError(f"model.extended_vocab is {extended_vocab:,} but tokenizer {path} has "
                        f"{fp['vocab_size']:,} pieces (len(tokenizer))")
    if fp["vocab_size"] <= orig:
        raise UserError(f"tokenizer {path} has {fp['vocab_size']:,} pieces, not more than the base's "
                        f"{orig:,}: there is no vocabulary to extend")
    return MergedVocab(str(path), fp, orig, fp["vocab_size"], report)


def base_available(vocab: MergedVocab) -> bool:
    """Whether the base tokenizer the merge report names can be read here (``new_row_init: auto`` then spells
    the new tokens with it)."""
    base_path = vocab.report.get("base", {}).get("path")
    return bool(base_path) and Path(base_path).exists()


def subword_spellings(vocab: MergedVocab) -> list[list[int]]:
    """For each appended token, the base ids the base tokenizer splits its text into: SentencePiece pieces
    ("▁" read as a space), or a byte-level BPE token's bytes run through the base's own merges (so a token
    that is part of a character still gets the base tokens of its bytes)."""
    from ..model.vocab import subword_ids_for

    base_path = vocab.report.get("base", {}).get("path")
    if not base_available(vocab):
        raise UserError(f"model.new_row_init: subword needs the base tokenizer named in {vocab.path}'s merge report "
                        f"({base_path or 'none recorded'}), which is not readable here")
    if vocab.fingerprint.get("backend") == "bpe":
        return bpe_spellings(base_path, vocab.path, vocab.orig_vocab, vocab.new_vocab)
    base, merged = spm.processor(base_path), spm.processor(vocab.path)
    return subword_ids_for([merged.id_to_piece(i) for i in range(vocab.orig_vocab, vocab.new_vocab)], base)


def bpe_spellings(base_path: str, merged_path: str, orig_vocab: int, new_vocab: int) -> list[list[int]]:
    """Byte-level BPE: the base model's BPE applied to each new token's string (both in the byte alphabet,
    no pre-tokenizer, so partial UTF-8 sequences spell too); a token the base's model cannot spell (an added
    token) gets [] (the mean of all rows)."""
    from . import bpe

    base, _ = bpe.load(base_path, role="base tokenizer")
    merged, _ = bpe.load(merged_path)
    out = []
    for i in range(orig_vocab, new_vocab):
        token = merged.id_to_token(i)
        try:
            ids = [t.id for t in base.model.tokenize(token)] if token is not None else []
        except Exception:  # tokenizers raises on a character outside the base's alphabet
            ids = []
        out.append([j for j in ids if j < orig_vocab])
    return out
