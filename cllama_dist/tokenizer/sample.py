"""What both tokenizer trainers (SentencePiece: train.py, byte-level BPE: bpe_train.py) learn from: a corpus
streamed once, cut into sentences, and a seeded reservoir that keeps a uniform sample of them, so memory
depends on the sample size and never on the corpus.
"""

from __future__ import annotations

import random
import re
from typing import Iterator

# CJK Unified Ideographs, Extension A and the compatibility block.
CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Cut after sentence-final punctuation (Chinese and Western), keeping the mark with its sentence.
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;…])")


def split_sentences(text: str, max_chars: int) -> Iterator[str]:
    """Lines of a document, long lines cut at sentence punctuation, then hard at ``max_chars``."""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if len(line) <= max_chars:
            yield line
            continue
        buf = ""
        for part in _SENTENCE_END.split(line):
            while len(part) > max_chars:
                if buf:
                    yield buf
                    buf = ""
                yield part[:max_chars]
                part = part[max_chars:]
            if len(buf) + len(part) > max_chars:
                if buf:
                    yield buf
                buf = part
            else:
                buf += part
        if buf.strip():
            yield buf


class Reservoir:
    """Uniform sample of at most ``size`` items from a stream of unknown length (algorithm R)."""

    def __init__(self, size: int, seed: int):
        self.size = size
        self.items: list[str] = []
        self.seen = 0
        self._rng = random.Random(seed)

    def add(self, item: str) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item
