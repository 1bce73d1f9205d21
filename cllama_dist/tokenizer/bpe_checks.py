"""Checks of an extended byte-level BPE: base-language invariance, decode round trip, digit grouping.

Base-language texts come from what every machine has: English prose (the standard library's docstrings),
Python source (standard-library modules) and numbers (generated), so the check needs no download.
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from .base import stdlib_docstrings

SOURCE_FILES = ("json/decoder.py", "textwrap.py", "string.py", "bisect.py", "fractions.py", "csv.py", "shlex.py",
                "heapq.py", "calendar.py", "difflib.py")


def _numbers(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.choice(["int", "float", "date", "grouped", "phone", "mixed"])
        if k == "int":
            out.append(str(rng.randrange(10 ** rng.randint(1, 12))))
        elif k == "float":
            out.append(f"{rng.uniform(-1e4, 1e4):.{rng.randint(1, 6)}f}")
        elif k == "date":
            out.append(f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}")
        elif k == "grouped":
            out.append(f"{rng.randrange(10 ** 9):,}")
        elif k == "phone":
            out.append(f"+{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}")
        else:
            out.append(f"In {rng.randint(1900, 2099)}, {rng.randint(2, 99)} of {rng.randint(100, 9999)} items cost "
                       f"${rng.uniform(0, 1000):.2f}.")
    return out


def base_language_texts(max_docstrings: int = 400) -> dict[str, list[str]]:
    """{"english": [...], "python": [...], "numbers": [...]}: texts without the new script."""
    root = Path(sysconfig.get_paths()["stdlib"])
    source = []
    for name in SOURCE_FILES:
        try:
            source.append((root / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return {"english": stdlib_docstrings(200_000)[:max_docstrings], "python": source, "numbers": _numbers()}


def changed_ids(base_tok, tok, texts: dict[str, list[str]], rule) -> dict[str, int]:
    """Per group, how many texts without the script get other ids from ``tok`` than from ``base_tok``."""
    out = {}
    for group, items in texts.items():
        items = [t for t in items if not rule.text_has_script(t)]
        a = base_tok.encode_batch(items, add_special_tokens=False)
        b = tok.encode_batch(items, add_special_tokens=False)
        out[group] = sum(1 for x, y in zip(a, b) if x.ids != y.ids)
    return out


def round_trip_failures(tok, texts: list[str]) -> int:
    """Texts that decode(encode(text)) does not give back exactly."""
    enc = tok.encode_batch(texts, add_special_tokens=False)
    dec = tok.decode_batch([e.ids for e in enc], skip_special_tokens=False)
    return sum(1 for t, d in zip(texts, dec) if t != d)


def digit_grouping(tok) -> dict[str, list[str]]:
    """How a few numbers are cut into tokens (Llama 3: up to three digits; Qwen, SmolLM2: one by one)."""
    samples = ["2026", "1234567", "3.14159", "12月7日", "第100号"]
    return {s: tok.encode(s, add_special_tokens=False).tokens for s in samples}
