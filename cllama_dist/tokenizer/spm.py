"""SentencePiece model files: loading with clear errors, the fingerprint, the Hugging Face folder.

The fingerprint is the contract between the stages: the merge writes it, the preprocessor stamps it
into the shard manifest, the trainer compares it with its own tokenizer before building anything.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def fingerprint(path: str | os.PathLike) -> dict:
    """sha256 of the model file, vocabulary size and special ids: what the shards must agree with."""
    p = model_path(path)
    data = p.read_bytes()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=data)
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "vocab_size": sp.get_piece_size(),
        "unk_id": sp.unk_id(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "pad_id": sp.pad_id(),
    }


def write_hf_folder(out: Path, model_bytes: bytes, proto) -> None:
    """Write a Hugging Face tokenizer folder around a SentencePiece model.

    ``tokenizer_class`` is transformers' ``SentencePieceBackend``: it encodes with SentencePiece itself,
    so ids equal SentencePiece's exactly. The fast (``tokenizers``) conversion cannot: the paper's
    merge gives every appended piece score 0, SentencePiece's BPE breaks such ties by position
    (leftmost pair first), and a merges list can only rank pairs, so the two disagree on most Chinese
    documents. transformers 5 no longer has a slow LlamaTokenizer, and LlamaTokenizer(vocab_file=...)
    silently builds an empty tokenizer (3 pieces; docs/hazards.md#h11); this folder avoids both.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_FILE).write_bytes(model_bytes)
    ts = proto.trainer_spec
    pieces = proto.pieces

    def piece(i: int) -> str | None:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    special = {"unk_token": piece(ts.unk_id), "bos_token": piece(ts.bos_id), "eos_token": piece(ts.eos_id)}
    if ts.pad_id >= 0:
        special["pad_token"] = piece(ts.pad_id)
    special = {k: v for k, v in special.items() if v}
    config = {
        "tokenizer_class": "SentencePieceBackend",
        "backend": "sentencepiece",
        # LLaMA's convention: BOS before every sequence, no EOS.
        "special_tokens_pattern": "bos",
        "legacy": True,  # encode with SentencePiece as it is (dummy prefix included), like the original
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000_000,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
