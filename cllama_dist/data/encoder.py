"""The tokenizer as the preprocessing kinds encode with it (data/preprocess.py, data/sft.py).

An ``Encoder`` travels with a kind's chunk encoder to the worker processes, so it pickles as its model's path alone
and loads the model in each process on first use (``load``). The machinery (data/pipeline) never sees one: a
second backend (a Hugging Face ``tokenizers`` byte-level BPE) is a second class here, chosen by ``open_encoder``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..tokenizer import spm as spmio


class Encoder(Protocol):
    """What the kinds ask of a tokenizer."""

    path: str  # the model file: what the output must not overwrite (files.check_not_input)

    def fingerprint(self) -> dict:
        """What plans and manifests record of it (vocab_size, sha256, bos/eos/unk ids; tokenizer.spm.fingerprint)."""

    def load(self) -> None:
        """(Re)load the model in this process: once per worker, before its first chunk."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The ids of each text, without BOS / EOS."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...


class SentencePieceEncoder:
    """A SentencePiece model (the merged tokenizer's tokenizer.model). ``processor`` is the SentencePiece
    processor itself, for what reads its API (sft.encode renders templates segment by segment with it)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._sp = None

    def __getstate__(self) -> dict:
        return {"path": self.path}  # the loaded model stays behind: each process loads its own

    def __setstate__(self, state: dict) -> None:
        self.path, self._sp = state["path"], None

    def fingerprint(self) -> dict:
        return spmio.fingerprint(self.path)

    def load(self) -> None:
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_file=self.path)

    @property
    def processor(self):
        if self._sp is None:
            self.load()
        return self._sp

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, num_threads=1)

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()


class TokenizersEncoder:
    """A byte-level BPE tokenizer.json (a `cllama tokenizer merge` folder of a BPE base), through `tokenizers`'
    own encode_batch; BOS / EOS are the tokenizer_config.json's bos_token / eos_token beside it."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._tok = None
        self._fp: dict | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path, self._tok, self._fp = state["path"], None, None

    def load(self) -> None:
        from ..tokenizer import bpe

        self._tok = bpe.load(self.path)[0]

    @property
    def tokenizer(self):
        if self._tok is None:
            self.load()
        return self._tok

    def fingerprint(self) -> dict:
        if self._fp is None:
            from ..tokenizer import bpe

            fp = bpe.fingerprint(self.tokenizer)
            fp.update({f"{k}_id": self._special_id(k) for k in ("bos", "eos", "unk", "pad")})
            self._fp = fp
        return self._fp

    def _special_id(self, kind: str) -> int:
        """The id of tokenizer_config.json's ``{kind}_token`` (-1 when it names none, as SentencePiece's)."""
        import json

        cfg = Path(self.path).parent / "tokenizer_config.json"
        try:
            value = json.loads(cfg.read_text(encoding="utf-8")).get(f"{kind}_token") if cfg.is_file() else None
        except (OSError, ValueError):
            value = None
        if isinstance(value, dict):
            value = value.get("content")
        i = self.tokenizer.token_to_id(value) if isinstance(value, str) else None
        return -1 if i is None else i

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20): the same ids without computing character offsets.
        tok = self.tokenizer
        encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def _required(self, kind: str) -> int:
        i = self.fingerprint()[f"{kind}_id"]
        if i < 0:
            from ..errors import UserError

            raise UserError(f"{self.path}: no {kind}_token in the tokenizer_config.json beside it: add one, or "
                            f"preprocess with --no-add-{kind}")
        return i

    @property
    def bos_id(self) -> int:
        return self._required("bos")

    @property
    def eos_id(self) -> int:
        return self._required("eos")


def open_encoder(tokenizer: str) -> SentencePieceEncoder | TokenizersEncoder:
    """The encoder of the tokenizer at ``tokenizer`` (a merged tokenizer folder or its model file), the backend chosen
    from its files (tokenizer/backend.py). Anything else is refused now, in one line, not by the backend later."""
    from ..tokenizer import backend, bpe

    if backend.detect(tokenizer) == "bpe":
        bpe.load(tokenizer)  # refuses, in one line, what does not load
        return TokenizersEncoder(bpe.tokenizer_file(tokenizer))
    spmio.load_proto(tokenizer)
    return SentencePieceEncoder(spmio.model_path(tokenizer))
