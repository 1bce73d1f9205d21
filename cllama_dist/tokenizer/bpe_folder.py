"""The output folder of a BPE merge: Hugging Face files beside tokenizer.json, written whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import UserError
from ..files import LOCK, MARKER, Lock, check_not_input, folder_kind, os_error, write_atomic

# Settings of the base's tokenizer_config.json that describe encoding or chat, carried over as they are.
CARRIED = ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template", "model_max_length",
           "clean_up_tokenization_spaces", "add_bos_token", "add_eos_token", "model_input_names", "padding_side")


def write_hf_files(folder: Path, tok, info: dict) -> dict:
    """tokenizer_config.json and special_tokens_map.json beside tokenizer.json; the base's chat template kept.

    The class is PreTrainedTokenizerFast (TokenizersBackend in transformers 5): it loads tokenizer.json as it is,
    where a model-specific class may rebuild the tokenizer from vocabulary and merges.
    """
    base_cfg = info.get("tokenizer_config") or {}
    cfg = {k: base_cfg[k] for k in CARRIED if k in base_cfg}
    for k in ("bos_token", "eos_token"):
        if k not in cfg and info.get(k):
            cfg[k] = info[k]
    if "chat_template" not in cfg and info.get("chat_template"):
        cfg["chat_template"] = info["chat_template"]
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.setdefault("clean_up_tokenization_spaces", False)
    added = tok.get_added_tokens_decoder()
    cfg["added_tokens_decoder"] = {
        str(i): {"content": a.content, "lstrip": a.lstrip, "rstrip": a.rstrip, "normalized": a.normalized,
                 "single_word": a.single_word, "special": a.special} for i, a in sorted(added.items())}
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if isinstance(cfg.get(k), (str, dict))}
    write_atomic(folder / "tokenizer_config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    write_atomic(folder / "special_tokens_map.json", json.dumps(specials, indent=2, ensure_ascii=False) + "\n")
    return {"layout": "bpe", "files": ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"],
            "chat_template": "chat_template" in cfg}


def check_output(cfg, out: Path) -> None:
    """Refuse an output folder that is an input, someone else's folder, or an existing one without --overwrite."""
    check_not_input(out, {"base tokenizer": cfg.base, "tokenizer to add": cfg.add}, "tokenizer")
    check_replaceable(out, cfg.overwrite)


def check_replaceable(out: Path, overwrite: bool) -> None:
    """Refuse a tokenizer output that is a file, a folder this project did not make as a tokenizer, or an existing
    tokenizer without --overwrite (both merges, SentencePiece and BPE, write their folder under this rule)."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"the tokenizer output {out} is a file, not a folder; choose a folder path")
        if any(out.iterdir()):
            kind = folder_kind(out)
            if kind != "tokenizer":
                raise UserError(f"the tokenizer output {out} is a folder that cllama-dist did not create as a tokenizer "
                                f"({'it holds a ' + kind if kind else 'no ' + MARKER}); it is never replaced: choose "
                                "another folder")
            if not overwrite:
                raise UserError(f"the tokenizer output {out} exists; pass --overwrite to replace it")


def publish(cfg, out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` into a temporary sibling of ``out`` and swap it in: a crash never leaves half a folder."""
    check_output(cfg, out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, out.parent, "create") from None
    with Lock(out.parent / f".{out.name}{LOCK}", "tokenizer merge"):
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            write_atomic(tmp / MARKER, json.dumps({"kind": "tokenizer", "tool": f"cllama-dist {__version__}"}) + "\n")
            write(tmp)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            if out.exists():
                out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise os_error(exc, out) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
