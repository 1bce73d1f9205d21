"""The demo's instruction set (original data written for this project) under cllama_dist/assets/instructions/.

It lives next to the corpus in assets/; this helper is here rather than in cllama_dist/assets so that
the instruction-tuning code keeps to its own package.
"""

from __future__ import annotations

from pathlib import Path

INSTRUCTIONS = Path(__file__).resolve().parents[1] / "assets" / "instructions"

# File name -> format. Training files first; the held-out file holds mechanical tasks whose answers
# are checked exactly.
FILES = {
    "general.jsonl": "alpaca",
    "dialogues.jsonl": "chat",
    "mechanical_train.jsonl": "alpaca",
    "mechanical_chat.jsonl": "chat",
    "mechanical_heldout.jsonl": "alpaca",
}
TRAIN = ("general.jsonl", "dialogues.jsonl", "mechanical_train.jsonl", "mechanical_chat.jsonl")
HELDOUT = "mechanical_heldout.jsonl"


def instructions_dir() -> Path:
    return INSTRUCTIONS


def train_files() -> list[Path]:
    return [INSTRUCTIONS / n for n in TRAIN]


def heldout_file() -> Path:
    return INSTRUCTIONS / HELDOUT
