"""Data shipped with the package: the demo's Chinese corpus (original prose written for this project)."""

from pathlib import Path

HERE = Path(__file__).parent

# Chinese prompts for generation checks (cllama eval --generate, the demo's generate stage): defined once.
ZH_PROMPTS = ["中国的首都是", "人工智能", "春天来了，"]


def corpus_path() -> Path:
    """The shipped Chinese corpus: JSON Lines with text, topic and title."""
    return HERE / "zh_corpus.jsonl"
