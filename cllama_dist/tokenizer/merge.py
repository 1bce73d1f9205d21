"""Merge a new-language SentencePiece model into a base one by union, keeping every base id.

    cllama tokenizer merge --base llama/tokenizer.model --add chinese_sp.model --out merged/

Every base piece keeps its id, score and type; pieces of ADD that BASE lacks are appended in ADD's
order. BASE's normalizer and trainer spec are kept. With LLaMA's tokenizer and the paper's 20K
Chinese model the default (``new_piece_score: paper``) writes the published Chinese-LLaMA tokenizer
byte for byte: 49,953 pieces, 17,953 of them new, 757,958 bytes.

``new_piece_score: exact`` gives the appended pieces distinct scores above the base's instead of 0, so
that a merges list reproduces SentencePiece exactly, and writes that fast tokenizer (tokenizer.json)
too; its encodings differ from the paper's on most Chinese documents, with about the same number of
tokens (see ``cllama tokenizer report`` given both). The folder layouts are described in hf.py.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import os
from pathlib import Path

from .. import __version__
from ..config import to_dict
from ..files import LOCK, MARKER, Lock, check_not_input, os_error, write_atomic
from .config import MergeConfig
from ..errors import UserError
from . import hf
from .bpe_folder import check_replaceable
from . import spm as spmio

# Two or more consecutive digits, ASCII or full-width: LLaMA never emits such a piece (split_digits).
MULTI_DIGIT = re.compile("[0-9０-９]{2,}")


SCORE_MODES = ("paper", "below-base", "exact")


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _f32_step(x: float, up: bool) -> float:
    """The next float32 above (``up``) or below ``x``."""
    if x == 0:
        return _f32(1e-45) if up else -_f32(1e-45)
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    bits += 1 if (x > 0) == up else -1
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _distinct_scores(start: float, n: int, up: bool) -> list[float]:
    """n float32 scores strictly beyond ``start``, one apart where float32 can tell them apart.

    Scores are float32 in the model file: near LLaMA's lowest score (-1e9) consecutive integers round
    to the same value, so "lowest - 1 - k" would give tied scores (and ties with the base).
    """
    out, prev = [], _f32(start)
    for k in range(1, n + 1):
        cand = _f32(start + k if up else start - k)
        if (cand <= prev) if up else (cand >= prev):
            cand = _f32_step(prev, up)
        out.append(cand)
        prev = cand
    return out


def new_piece_scores(base, n: int, mode: str) -> list[float]:
    """Scores for ``n`` appended pieces, in append order; base pieces keep theirs in every mode.

    - "paper": 0 for all, as the paper's script (above every LLaMA score, which are negative; the
      appended pieces tie, and SentencePiece merges tied pairs leftmost first).
    - "below-base": distinct, decreasing, below the lowest base score: base merges always go first.
    - "exact": distinct, decreasing, above the highest base score: like the paper, appended pieces merge
      before base pieces, but in a fixed order (the added model's piece order, which for a unigram
      model is by decreasing probability) instead of by position. With no ties a merges list can
      reproduce SentencePiece, so the merge writes an exact tokenizer.json.
    """
    if mode == "paper":
        return [0.0] * n
    normal = [p.score for p in base.pieces if p.type == spmio.NORMAL] or [0.0]
    if mode == "below-base":
        return _distinct_scores(min(normal), n, up=False)
    if mode == "exact":
        return _distinct_scores(max(normal), n, up=True)[::-1]
    raise UserError(f"new_piece_score must be one of {list(SCORE_MODES)}, not {mode!r}")


def merge_protos(base, add, cfg: MergeConfig):
    """Return (merged proto, statistics). ``base`` and ``add`` are left untouched."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    mode = getattr(cfg, "new_piece_score", "paper")
    merged = pb.ModelProto()
    merged.CopyFrom(base)
    have = {p.piece for p in base.pieces}
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
        have.add(p.piece)
        added_pieces.append(p.piece)
    for piece, score in zip(added_pieces, new_piece_scores(base, len(added_pieces), mode)):
        q = merged.pieces.add()
        # Only piece and score, as the paper's script: `type` stays unset and reads as NORMAL. Setting
        # it explicitly is the same model, but proto2 then serialises the field (2 bytes a piece), and
        # the file is no longer byte-identical to the published Chinese-LLaMA tokenizer.
        q.piece = piece
        q.score = score
    stats["added"] = len(added_pieces)
    return merged, stats


def merge(cfg: MergeConfig) -> dict:
    """Write the merged tokenizer folder; returns the merge report."""
    import sentencepiece as spm
    from . import backend

    if backend.detect(cfg.base) == "bpe":
        from .bpe_merge import merge as merge_bpe

        return merge_bpe(cfg)
    if backend.detect(cfg.add) == "bpe":
        raise UserError(f"--add {cfg.add} is a byte-level BPE tokenizer but the base {cfg.base} is SentencePiece: "
                        "train the new vocabulary without --base (a SentencePiece .model) and add that")
    base = spmio.load_proto(cfg.base, "base tokenizer")
    add = spmio.load_proto(cfg.add, "tokenizer to add")
    out = Path(cfg.out)
    # tokenizer.model usually sits in the model's folder: merging "into" it would replace the model's files.
    check_not_input(out, {"base tokenizer": spmio.model_path(cfg.base), "tokenizer to add": spmio.model_path(cfg.add)},
                    "tokenizer")
    check_replaceable(out, cfg.overwrite)

    mode = getattr(cfg, "new_piece_score", "paper")
    if mode not in SCORE_MODES:
        raise UserError(f"new_piece_score must be one of {list(SCORE_MODES)}, not {mode!r}")
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

    # Write into a temporary sibling, then swap it in: a crash never leaves a half-written folder. (Not
    # mkdtemp: it creates folders readable by their owner alone, and a tokenizer is shared on a cluster.)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, out.parent, "create") from None
    lock = Lock(out.parent / f".{out.name}{LOCK}", "tokenizer merge")
    with lock:
        return _write(cfg, out, base, add, merged, stats, data, sp, n_base, mode)


def _write(cfg: MergeConfig, out: Path, base, add, merged, stats: dict, data: bytes, sp, n_base: int, mode: str) -> dict:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_atomic(tmp / MARKER, json.dumps({"kind": "tokenizer", "tool": f"cllama-dist {__version__}"}) + "\n")
        # The paper's layout is SentencePiece-only (its tied scores rule out an exact tokenizer.json);
        # "exact" exists to have one, so failing to write it is an error; "below-base" gets one when
        # the base allows it.
        fast = {"paper": False, "exact": True}.get(mode, "auto")
        try:
            hf_folder = hf.write_folder(tmp, data, merged, fast=fast)
        except UserError as exc:
            raise UserError(f"new_piece_score 'exact' with base {spmio.model_path(cfg.base)}: {exc}") from None
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
            "new_piece_score": mode,
            "fingerprint": fp,
            "hf_folder": hf_folder,
            "notes": _notes(base, add) + _layout_notes(hf_folder),
            "config": to_dict(cfg),
        }
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(exc, out) from None
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


def _layout_notes(hf_folder: dict) -> list[str]:
    if hf_folder["layout"] == "fast":
        return ["tokenizer.json is an exact fast tokenizer (checked against SentencePiece); transformers 4.x "
                "and 5.x load it with AutoTokenizer"]
    return ["no tokenizer.json: a fast tokenizer cannot reproduce this model ("
            + "; ".join(hf_folder["fast_problems"]) + "); transformers 4.x and 5.x load the folder with "
            "AutoTokenizer.from_pretrained(DIR, trust_remote_code=True) (tokenization_cllama.py: SentencePiece's ids and "
            "decode); without trust_remote_code 5.x gives SentencePieceBackend (the same ids, byte pieces decode as "
            "<0x..>) and 4.x refuses (see TOKENIZER.md)"]
