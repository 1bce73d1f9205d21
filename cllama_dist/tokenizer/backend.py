"""The tokenizer seam: which backend a base's files need, and the fingerprint either backend gives.

- "sentencepiece": a SentencePiece `tokenizer.model` (LLaMA 1/2, Mistral v0.1-v0.3); spm.py, today's code.
- "bpe": a byte-level BPE (`tokenizer.json`, a tiktoken ranks file, a GGUF file); bpe.py.

The backend is chosen from the files alone, so every stage (train, merge, report, preprocess) decides alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from ..errors import UserError
from . import bpe

Backend = Literal["sentencepiece", "bpe"]


def _file_backend(p: Path) -> Backend:
    if p.suffix == ".gguf" or p.name == "tekken.json":
        return "bpe"
    try:
        with open(p, "rb") as f:
            head = f.read(64).lstrip()
    except OSError as exc:
        raise UserError(f"cannot read tokenizer {p}: {exc.strerror}") from None
    if head[:1] in (b"{", b"[") and p.suffix == ".json":
        return "bpe"  # (other JSON, a corpus given by mistake, gets SentencePiece's "not a SentencePiece model")
    if bpe.is_tiktoken(p):
        return "bpe"
    return "sentencepiece"


def detect(path: str | os.PathLike) -> Backend:
    """The backend a base (a folder or a tokenizer file) needs.

    A folder with a `tokenizer.json` is read through it even if it also holds a `tokenizer.model`, unless that
    model is SentencePiece: SentencePiece folders written by `cllama tokenizer merge` carry both, and their
    tokenizer.model is the reference.
    """
    p = Path(path)
    if p.is_dir():
        model = p / "tokenizer.model"
        if model.is_file() and _file_backend(model) == "sentencepiece":
            return "sentencepiece"
        if any((p / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tekken.json")) or any(p.glob("*.gguf")):
            return "bpe"
        raise UserError(f"{p} holds neither tokenizer.model nor tokenizer.json: give the base model's folder (or its "
                        "tokenizer file)")
    if not p.exists():
        raise UserError(f"tokenizer not found: {p}")
    return _file_backend(p)


def fingerprint(path: str | os.PathLike, split_pattern: str = "") -> dict:
    """The fingerprint of either backend, with the backend named."""
    if detect(path) == "sentencepiece":
        from . import spm

        return {"backend": "sentencepiece", **spm.fingerprint(path)}
    tok, _ = bpe.load(path, split_pattern=split_pattern)
    return bpe.fingerprint(tok)
