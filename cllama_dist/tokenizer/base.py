"""Build a small LLaMA-style base tokenizer from text every machine has, for the offline demo.

The demo must run without a model hub, and LLaMA's tokenizer.model is not ours to ship. So it trains
a BPE model with LLaMA's own trainer settings (read off LLaMA's tokenizer.model: byte fallback,
split digits, identity normalizer, whitespace-only pieces, ids unk=0 bos=1 eos=2) on the English
docstrings of the Python standard library. Like LLaMA, it knows almost no Chinese, so Chinese text
falls back to bytes, which is exactly the situation the vocabulary extension fixes.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

from . import hf
from . import spm as spmio

# LLaMA's trainer settings (from the trainer_spec in LLaMA's tokenizer.model).
LLAMA_TRAINER = dict(
    model_type="bpe",
    character_coverage=0.99995,
    byte_fallback=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
)


def stdlib_docstrings(max_chars: int = 2_000_000) -> list[str]:
    """Docstring paragraphs of the standard library, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    out: list[str] = []
    total = 0
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "site-packages", "idlelib", "__pycache__"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(dirpath, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = ast.get_docstring(node)
                    if not text:
                        continue
                    for para in text.split("\n\n"):
                        para = " ".join(para.split())
                        if len(para) >= 20:
                            out.append(para)
                            total += len(para)
                            if total >= max_chars:
                                return out
    return out


def build_base_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 4000, seed: int = 0) -> Path:
    """Train the base model into ``out_dir`` (tokenizer.model plus the Hugging Face files)."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    prefix = out / "base"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_docstrings()),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        num_threads=1,  # deterministic
        minloglevel=2,
        **LLAMA_TRAINER,
    )
    data = Path(f"{prefix}.model").read_bytes()
    hf.write_folder(out, data, spmio.load_proto(f"{prefix}.model"))
    for suffix in (".model", ".vocab"):
        Path(f"{prefix}{suffix}").unlink()
    return out / spmio.MODEL_FILE
