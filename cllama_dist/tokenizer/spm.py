"""SentencePiece model files: loading with clear errors, the fingerprint, the Hugging Face folder.

The fingerprint is the contract between the stages: the merge writes it, the preprocessor stamps it
into the shard manifest, the trainer compares it with its own tokenizer before building anything.
Its ``sha256`` is a hash of what encoding depends on, not of the file's bytes (see below).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from ..errors import UserError

MODEL_FILE = "tokenizer.model"

# Piece types of sentencepiece_model.proto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def model_path(path: str | os.PathLike) -> Path:
    """A SentencePiece model file, or the tokenizer.model inside a folder."""
    p = Path(path)
    if p.is_dir():
        inner = p / MODEL_FILE
        if not inner.is_file():
            raise UserError(f"{p} is a folder without {MODEL_FILE}: not a SentencePiece tokenizer folder")
        return inner
    if not p.exists():
        raise UserError(f"tokenizer not found: {p}")
    return p


def load_proto(path: str | os.PathLike, role: str = "tokenizer"):
    """Parse a SentencePiece ModelProto, refusing anything that is not one with a message saying what it is."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    p = model_path(path)
    data = p.read_bytes()
    if not data:
        raise UserError(f"{role} {p} is empty")
    head = data[:64].lstrip()
    if head[:1] in (b"{", b"["):
        raise UserError(
            f"{role} {p} is a JSON file (a Hugging Face tokenizer.json, e.g. byte-level BPE?), not a "
            "SentencePiece model; the merge needs a SentencePiece .model (LLaMA's tokenizer.model)"
        )
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:
        raise UserError(f"{role} {p} is not a SentencePiece model (cannot parse it as a ModelProto)") from None
    if len(proto.pieces) == 0:
        raise UserError(f"{role} {p} is not a SentencePiece model (it parses, but holds no pieces)")
    # Every trained or merged model holds both specs, written after the pieces: a file without them is cut short
    # (or hand-made), and SentencePiece would read it as a smaller vocabulary with default settings.
    missing = [name for name in ("trainer_spec", "normalizer_spec") if not proto.HasField(name)]
    if missing:
        raise UserError(f"{role} {p} is incomplete: it holds {len(proto.pieces):,} pieces but no "
                        f"{' and no '.join(missing)} (a truncated or damaged file?); copy the tokenizer again")
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_proto=data)
    except Exception as exc:
        raise UserError(f"{role} {p} is not a usable SentencePiece model: {exc}") from None
    return proto


def processor(path: str | os.PathLike):
    import sentencepiece as spm

    load_proto(path)  # clear errors first
    return spm.SentencePieceProcessor(model_file=str(model_path(path)))


# --------------------------------------------------------------------------------------------------
# The fingerprint.
#
# Two files that encode every text to the same ids must have the same fingerprint, whatever else
# their bytes hold: the same pieces written with `type` explicitly set (proto2 serialises an
# explicitly set default: 2 bytes a piece), trainer_specs naming other input files, model prefixes,
# thread counts or seeds. So the fingerprint hashes what SentencePiece reads when it encodes and
# decodes, and nothing else. Read off SentencePiece's source (github.com/google/sentencepiece at
# 2734490, v0.2.1; src/):
#   - every piece's (piece, score, type), in id order: ids, merge candidates and scores
#     (model_interface.cc InitializePieces; bpe_model.cc MaybeAddNewSymbolPair, GetScore;
#     unigram_model.cc lattice scores), the user-defined prefix matcher (model_interface.cc:150);
#   - trainer_spec.model_type: which algorithm encodes (model_factory.cc:29);
#   - trainer_spec.byte_fallback (model_interface.cc:118,140; model_interface.h:186: unknown
#     characters become byte pieces, sentencepiece_processor.cc:581);
#   - trainer_spec.treat_whitespace_as_suffix (normalizer.cc:35,128,179: where the dummy "▁" goes);
#   - trainer_spec.unk_piece, bos_piece, eos_piece, pad_piece (model_interface.cc:29-47; an empty one
#     means the default), which name the special ids (sentencepiece_processor.cc:994-1016);
#   - trainer_spec.unk_surface, what <unk> decodes to (sentencepiece_processor.cc:771-773);
#   - normalizer_spec.precompiled_charsmap, add_dummy_prefix, remove_extra_whitespaces,
#     escape_whitespaces (normalizer.cc:48,86,113,128,130,143,160);
#   - denormalizer_spec, the same four fields, only when its charsmap is non-empty: otherwise no
#     denormalizer is built (sentencepiece_processor.cc:248-251).
# Not hashed, because only the trainer reads them (trainer_interface.cc:70,217,250-300,603 and the
# *_trainer.cc files): input, model_prefix, num_threads, seeds and sizes, character_coverage,
# max_sentencepiece_length, split_by_unicode_script / number / whitespace, split_digits,
# allow_whitespace_only_pieces, pretokenization_delimiter, control/user_defined_symbols (the pieces
# themselves are hashed), required_chars, vocabulary_output_piece_score, hard_vocab_limit,
# use_all_vocab; nor the unk/bos/eos/pad *ids* of trainer_spec (the processor finds the special ids
# from the piece names and types above; they are returned next to the hash); nor the normalizer's
# name and normalization_rule_tsv (compiled into precompiled_charsmap at training time).
# tests/unit/test_tokenizer_fit.py flips these fields one at a time in a merged model and checks the
# installed sentencepiece (0.2.3 here) against this split: a field left out never changes encoding or
# decoding, a field hashed does.

FINGERPRINT_VERSION = 1
_DEFAULT_PIECES = {"unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>", "pad_piece": "<pad>"}


def _normalizer_doc(spec) -> dict:
    return {
        "precompiled_charsmap": spec.precompiled_charsmap.hex(),
        "add_dummy_prefix": spec.add_dummy_prefix,
        "remove_extra_whitespaces": spec.remove_extra_whitespaces,
        "escape_whitespaces": spec.escape_whitespaces,
    }


def _score_bits(score: float) -> str:
    # Scores are float32 in the proto; -0.0 and 0.0 compare equal in the encoder, so they hash equal.
    return struct.pack("<f", 0.0 if score == 0 else score).hex()


def encoding_document(proto) -> dict:
    """The values that determine SentencePiece's encoding and decoding (see the list above), as JSON."""
    ts = proto.trainer_spec
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "model_type": ts.model_type,
        "pieces": [[p.piece, _score_bits(p.score), p.type] for p in proto.pieces],
        "normalizer": _normalizer_doc(proto.normalizer_spec),
        "denormalizer": (_normalizer_doc(proto.denormalizer_spec)
                         if proto.denormalizer_spec.precompiled_charsmap else None),
        "trainer": {
            "byte_fallback": ts.byte_fallback,
            "treat_whitespace_as_suffix": ts.treat_whitespace_as_suffix,
            # The getter returns the proto default (" ⁇ ") when unset, which is also the C++ default.
            "unk_surface": ts.unk_surface,
            **{k: getattr(ts, k) or default for k, default in _DEFAULT_PIECES.items()},
        },
    }


def canonical_sha256(proto) -> str:
    """sha256 of ``encoding_document(proto)`` as compact, key-sorted UTF-8 JSON."""
    doc = json.dumps(encoding_document(proto), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


def fingerprint(path: str | os.PathLike) -> dict:
    """What the shards, the trainer and the exported adapter must agree on.

    ``sha256`` is ``canonical_sha256``: equal for files that encode alike however they were written;
    ``file_sha256`` is the file's own bytes (to find the very file); ``vocab_size`` and the special
    ids are the processor's.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    p = model_path(path)
    data = p.read_bytes()
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
        sp = spm.SentencePieceProcessor(model_proto=data)
    except Exception:
        load_proto(p)  # raises the precise UserError
        raise
    if not (proto.HasField("trainer_spec") and proto.HasField("normalizer_spec")):
        load_proto(p)  # refuses a model cut short
    return {
        "sha256": canonical_sha256(proto),
        "file_sha256": hashlib.sha256(data).hexdigest(),
        "fingerprint_version": FINGERPRINT_VERSION,
        "vocab_size": sp.get_piece_size(),
        "unk_id": sp.unk_id(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "pad_id": sp.pad_id(),
    }


def same_tokenizer(recorded_sha256: str, fp: dict) -> bool:
    """Whether a recorded tokenizer hash (a manifest's, a checkpoint's, an adapter's) names this tokenizer.

    Records written before fingerprint version 1 hold the sha256 of the file's bytes; later ones the canonical
    hash. Either match is the same tokenizer: identical bytes, or an identical encoding.
    """
    return recorded_sha256 in (fp["sha256"], fp.get("file_sha256"))
