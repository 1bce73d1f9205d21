"""The merged tokenizer as the trainer sees it: its fingerprint, the base vocabulary it extends, and how the
base tokenizer spells each appended piece (for the ``subword`` initialisation of new rows)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from . import spm


@dataclass(frozen=True)
class MergedVocab:
    path: str
    fingerprint: dict
    orig_vocab: int  # V: rows of the base model
    new_vocab: int   # V' = len(tokenizer)
    report: dict = field(default_factory=dict)  # merge_report.json, when the folder has one


def read_merged(path: str, model_vocab: int, extended_vocab: int = 0) -> MergedVocab:
    """Read the merged tokenizer folder; ``model_vocab`` is the base model's vocabulary size (used when the
    folder has no merge report); ``extended_vocab`` (if set) must equal len(tokenizer)."""
    if not path:
        raise UserError("model.tokenizer is required: the merged tokenizer folder")
    fp = spm.fingerprint(path)
    report_path = spm.model_path(path).parent / "merge_report.json"
    report = {}
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{report_path} is corrupt (not valid JSON: {exc})") from None
    orig = report.get("base", {}).get("vocab_size", model_vocab)
    # len(tokenizer), the pieces of the merged model, not transformers' tokenizer.vocab_size (docs/hazards.md#h2).
    if extended_vocab and extended_vocab != fp["vocab_size"]:
        raise UserError(f"model.extended_vocab is {extended_vocab:,} but tokenizer {path} has "
                        f"{fp['vocab_size']:,} pieces (len(tokenizer))")
    if fp["vocab_size"] <= orig:
        raise UserError(f"tokenizer {path} has {fp['vocab_size']:,} pieces, not more than the base's "
                        f"{orig:,}: there is no vocabulary to extend")
    return MergedVocab(str(path), fp, orig, fp["vocab_size"], report)


def subword_spellings(vocab: MergedVocab) -> list[list[int]]:
    """For each appended piece, the base ids the base tokenizer splits it into."""
    from ..model.vocab import subword_ids_for

    base_path = vocab.report.get("base", {}).get("path")
    if not base_path or not Path(base_path).exists():
        raise UserError(f"model.new_row_init: subword needs the base tokenizer named in the merge report "
                        f"({base_path or 'none recorded'}), which is not readable here")
    base, merged = spm.processor(base_path), spm.processor(vocab.path)
    return subword_ids_for([merged.id_to_piece(i) for i in range(vocab.orig_vocab, vocab.new_vocab)], base)
