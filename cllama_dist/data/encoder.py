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


def open_encoder(tokenizer: str) -> SentencePieceEncoder:
    """The encoder of the tokenizer at ``tokenizer`` (a merged tokenizer folder or its model file). A tokenizer.json or
    any other file is refused now, in one line, not by SentencePiece later."""
    spmio.load_proto(tokenizer)
    return SentencePieceEncoder(spmio.model_path(tokenizer))
