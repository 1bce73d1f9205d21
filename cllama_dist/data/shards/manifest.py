"""manifest.json: reading it (refusing another kind's), checking it against a run, listing its shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...errors import UserError
from .format import FORMAT, FORMAT_V1, MANIFEST, PRETRAIN_FORMATS, SFT_FORMAT


def load_manifest(folder: str | os.PathLike, formats: tuple[str, ...] = PRETRAIN_FORMATS) -> dict:
    """The folder's manifest.json, refused unless its format is one of ``formats`` (default: pre-training
    shards; ``load_sft_manifest`` reads instruction-tuning shards)."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        raise UserError(
            f"{folder} has no {MANIFEST}: not a finished preprocessing output (run `cllama preprocess`, "
            "or `cllama preprocess finalize` after an array of tasks)"
        )
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p} is corrupt (not valid JSON: {exc})") from None
    if m.get("format") not in formats:
        what = {FORMAT: "pre-training shards (`cllama preprocess`)", FORMAT_V1: "pre-training shards (`cllama preprocess`)",
                SFT_FORMAT: "instruction-tuning shards (`cllama preprocess-sft`)"}
        known = what.get(m.get("format"))
        if known:
            raise UserError(f"{p}: these are {known}, format {m.get('format')!r}; expected "
                            f"{' or '.join(what.get(f, repr(f)) for f in formats)}")
        raise UserError(f"{p}: unknown shard format {m.get('format')!r}, expected {' or '.join(map(repr, formats))}")
    return m


def check_manifest(manifest: dict, fingerprint: dict, block_size: int, where: str = "shards") -> None:
    """Refuse shards made with another tokenizer or block size, naming both values."""
    theirs = manifest["tokenizer"]
    problems = []
    # Fingerprints without "backend" are SentencePiece's (the only backend before byte-level BPE).
    if theirs.get("backend", "sentencepiece") != fingerprint.get("backend", "sentencepiece"):
        problems.append(f"tokenizer backend: shards {theirs.get('backend', 'sentencepiece')}, "
                        f"tokenizer {fingerprint.get('backend', 'sentencepiece')}")
    if theirs["vocab_size"] != fingerprint["vocab_size"]:
        problems.append(f"vocab size: shards {theirs['vocab_size']:,}, tokenizer {fingerprint['vocab_size']:,}")
    from ...tokenizer.spm import same_tokenizer

    if not same_tokenizer(theirs["sha256"], fingerprint):
        problems.append(f"tokenizer sha256: shards {theirs['sha256'][:16]}..., tokenizer {fingerprint['sha256'][:16]}...")
    for key in ("bos_id", "eos_id", "unk_id"):
        if theirs.get(key) != fingerprint.get(key):
            problems.append(f"{key}: shards {theirs.get(key)}, tokenizer {fingerprint.get(key)}")
    if manifest["block_size"] != block_size:
        problems.append(f"block size: shards {manifest['block_size']}, config {block_size}")
    if problems:
        raise UserError(f"{where} do not match this run: " + "; ".join(problems)
                        + " (re-run `cllama preprocess` with this tokenizer and block size)")


def load_sft_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of an instruction-tuning shard folder (refusing pre-training shards, naming them)."""
    return load_manifest(folder, formats=(SFT_FORMAT,))


def check_sft_manifest(manifest: dict, fingerprint: dict, block_size: int, where: str = "shards",
                       template_sha256: str | None = None) -> None:
    """What the trainer checks before building anything on instruction-tuning shards: the format, the tokenizer
    fingerprint and block size (``check_manifest``), and, when given, the chat template's sha256 (the template
    the exported tokenizer will carry must be the one the shards were rendered with)."""
    if manifest.get("format") != SFT_FORMAT:
        raise UserError(f"{where}: format {manifest.get('format')!r} is not instruction-tuning shards ({SFT_FORMAT!r}); "
                        "make them with `cllama preprocess-sft`")
    check_manifest(manifest, fingerprint, block_size, where)
    if template_sha256 is not None and manifest["template"]["sha256"] != template_sha256:
        t = manifest["template"]
        raise UserError(f"{where} were rendered with chat template {t['name']} (sha256 {t['sha256'][:16]}...), this run "
                        f"expects sha256 {template_sha256[:16]}...: re-run `cllama preprocess-sft` with this template")


def shard_list(manifest: dict) -> list[dict]:
    """Every shard the manifest names, train then validation, each with its split under "split"."""
    return [{**shard, "split": split} for split, info in manifest["splits"].items() for shard in info["shards"]]


def shard_subsets(manifest: dict, world: int) -> list[list[str]]:
    """The shards cut into ``world`` subsets of about equal bytes (largest first onto the lightest subset):
    the same cut on every rank, so that ranks can share the verification."""
    subsets: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for shard in sorted(shard_list(manifest), key=lambda x: (-int(x["bytes"]), x["file"])):
        k = min(range(world), key=lambda i: (load[i], i))
        subsets[k].append(shard["file"])
        load[k] += int(shard["bytes"])
    return subsets
