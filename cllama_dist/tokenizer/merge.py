"""Merge a new-language SentencePiece model into a base one by union, keeping every base id.

    cllama tokenizer merge --base llama/tokenizer.model --add chinese_sp.model --out merged/

Every base piece keeps its id, score and type; pieces of ADD that BASE lacks are appended in ADD's
order. BASE's normalizer and trainer spec are kept. With LLaMA's tokenizer and the paper's 20K
Chinese model this gives the published Chinese-LLaMA tokenizer: 49,953 pieces, 17,953 of them new.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from .. import __version__
from ..config import to_dict
from .config import MergeConfig
from ..errors import UserError
from . import spm as spmio

# Two or more consecutive digits, ASCII or full-width: LLaMA never emits such a piece (split_digits).
MULTI_DIGIT = re.compile("[0-9０-９]{2,}")


def merge_protos(base, add, cfg: MergeConfig):
    """Return (merged proto, statistics). ``base`` and ``add`` are left untouched."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    merged = pb.ModelProto()
    merged.CopyFrom(base)
    have = {p.piece for p in base.pieces}
    lowest = min((p.score for p in base.pieces if p.type == spmio.NORMAL), default=0.0)
    stats = {"overlap": 0, "added": 0, "skipped_special": 0, "skipped_multi_digit": 0}
    added_pieces: list[str] = []
    for p in add.pieces:
        if p.piece in have:
            stats["overlap"] += 1
            continue
        if p.type not in (spmio.NORMAL, spmio.USER_DEFINED):
            # Control, unknown, byte and unused pieces belong to ADD's own conventions, not to BASE's.
            stats["skipped_special"] += 1
            continue
        if cfg.drop_multi_digit and MULTI_DIGIT.search(p.piece):
            stats["skipped_multi_digit"] += 1
            continue
        q = merged.pieces.add()
        q.piece = p.piece
        q.type = spmio.NORMAL
        # The paper's script sets score 0 (above every LLaMA BPE score, which are all negative).
        q.score = 0.0 if cfg.new_piece_score == "paper" else lowest - 1.0 - len(added_pieces)
        have.add(p.piece)
        added_pieces.append(p.piece)
    stats["added"] = len(added_pieces)
    return merged, stats


def merge(cfg: MergeConfig) -> dict:
    """Write the merged tokenizer folder; returns the merge report."""
    import sentencepiece as spm

    base = spmio.load_proto(cfg.base, "base tokenizer")
    add = spmio.load_proto(cfg.add, "tokenizer to add")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"output folder {out} exists and is not empty (pass --overwrite to replace it)")

    merged, stats = merge_protos(base, add, cfg)
    data = merged.SerializeToString()
    sp = spm.SentencePieceProcessor(model_proto=data)
    # Guard the contract itself: every base piece must keep its id.
    n_base = len(base.pieces)
    for i in range(n_base):
        if sp.id_to_piece(i) != base.pieces[i].piece:
            raise RuntimeError(f"merge moved base piece {i} ({base.pieces[i].piece!r}); this is a bug")
    if sp.get_piece_size() != n_base + stats["added"]:
        raise RuntimeError("merged size disagrees with the count of added pieces; this is a bug")

    # Write into a temporary sibling, then swap it in: a crash never leaves a half-written folder.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        spmio.write_hf_folder(tmp, data, merged)
        fp = spmio.fingerprint(tmp)
        multi_digit = [p.piece for p in merged.pieces[n_base:] if MULTI_DIGIT.search(p.piece)]
        report = {
            "tool": f"cllama-dist {__version__}",
            "base": {"path": str(spmio.model_path(cfg.base)), **spmio.fingerprint(cfg.base),
                     "model_type": _model_type(base), "normalizer": base.normalizer_spec.name},
            "add": {"path": str(spmio.model_path(cfg.add)), **spmio.fingerprint(cfg.add),
                    "model_type": _model_type(add), "normalizer": add.normalizer_spec.name},
            "orig_vocab_size": n_base,
            "new_vocab_size": sp.get_piece_size(),
            "added": stats["added"],
            "overlap": stats["overlap"],
            "skipped_special": stats["skipped_special"],
            "skipped_multi_digit": stats["skipped_multi_digit"],
            "added_multi_digit": len(multi_digit),
            "added_multi_digit_examples": multi_digit[:20],
            "fingerprint": fp,
            "notes": _notes(base, add),
            "config": to_dict(cfg),
        }
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _model_type(proto) -> str:
    return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(proto.trainer_spec.model_type, "unknown")


def _notes(base, add) -> list[str]:
    notes = []
    if base.normalizer_spec.name != add.normalizer_spec.name:
        notes.append(
            f"the added pieces were learned under normalizer {add.normalizer_spec.name!r}; the merged "
            f"tokenizer keeps the base's {base.normalizer_spec.name!r}, so text is not normalized the way "
            "the added model expected (e.g. full-width forms stay full-width), as in the paper"
        )
    if _model_type(base) != _model_type(add):
        notes.append(
            f"the added pieces come from a {_model_type(add)} model but are used by the base's "
            f"{_model_type(base)} algorithm; some may never be produced (see `cllama tokenizer report`)"
        )
    return notes
