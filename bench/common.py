"""Shared by the benchmark scripts (imported as a sibling: they run as `python bench/NAME.py`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def commit() -> str:
    """The commit a benchmark measured: short hash, "+uncommitted" when tracked files differ from it."""
    if os.environ.get("CLLAMA_COMMIT"):  # the device machine gets a copy of the tree without .git
        return os.environ["CLLAMA_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"
