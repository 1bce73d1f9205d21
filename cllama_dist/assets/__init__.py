"""Data shipped with the package: the demo's Chinese corpus (original prose written for this project)."""

from pathlib import Path

HERE = Path(__file__).parent


def corpus_path() -> Path:
    """The shipped Chinese corpus: JSON Lines with text, topic and title."""
    return HERE / "zh_corpus.jsonl"
