"""Shared by the benchmark scripts (imported as a sibling: they run as `python bench/NAME.py`)."""

from __future__ import annotations

from pathlib import Path


def repeat_to_size(data: bytes, out: Path, mb: int) -> Path:
    """A corpus of at least ``mb`` MB made by repeating ``data``; an existing large-enough file is reused."""
    if out.is_file() and out.stat().st_size >= mb * 1_000_000:
        return out
    with open(out, "wb") as f:
        written = 0
        while written < mb * 1_000_000:
            f.write(data)
            written += len(data)
    return out
