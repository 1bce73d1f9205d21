"""Retention in one command: bits per character of several named inputs under several models.

    cllama eval --model BASE --adapter out/adapter --compare-base --compare merged=out/merged \\
        --text zh=heldout_zh.jsonl en=heldout_en.jsonl [--shard-sets zh-shards=shards/zh] [--json-out r.json]

Each model (the base alone with its own tokenizer, base + adapter, each --compare) scores each input
(perplexity.eval_text / perplexity.eval_shards, the figures ``cllama eval`` prints for one input), and the table puts
bits per character side by side, with the uniform baseline (log2 V x tokens per character) of each
model's tokenizer and the change against the first column: "Chinese improved by X, English lost Y".
Bits per character compare across tokenizers; loss per token does not.
"""

from __future__ import annotations

import dataclasses
import gc
import time

from ..config import to_dict
from ..errors import UserError
from .config import EvalConfig


def _named(items: list[str]) -> list[tuple[str, str]]:
    return [(i.partition("=")[0].strip(), i.partition("=")[2].strip()) for i in items]


def models_of(cfg: EvalConfig) -> list[tuple[str, dict]]:
    """(column name, the model settings to load) in table order: base, the main model, then --compare."""
    out = []
    if cfg.compare_base:
        out.append(("base", {"model": cfg.model, "adapter": "", "tokenizer": ""}))
    out.append(("base + adapter" if cfg.adapter else "model",
                {"model": cfg.model, "adapter": cfg.adapter, "tokenizer": cfg.tokenizer}))
    for name, spec in _named(cfg.compare):
        model, _, adapter = spec.partition("+")
        out.append((name, {"model": model, "adapter": adapter, "tokenizer": ""}))
    return out


def evaluate_table(cfg: EvalConfig) -> dict:
    from ..inference.load import load_model
    from .perplexity import eval_shards, eval_text

    inputs = [(n, "text", p) for n, p in _named(cfg.text)] + [(n, "shards", p) for n, p in _named(cfg.shard_sets)]
    cells: dict[str, dict[str, dict]] = {}
    models = models_of(cfg)
    described = {}
    for column, spec in models:
        mcfg = dataclasses.replace(cfg, text=[], shard_sets=[], compare=[], compare_base=False, inputs=["-"], **spec)
        model, tokenizer, what, device = load_model(mcfg)
        described[column] = {"model": what, "tokenizer": str(tokenizer.path), "vocab_size": tokenizer.size}
        max_pos = getattr(model.config, "max_position_embeddings", cfg.block_size) or cfg.block_size
        block = min(cfg.block_size, max_pos)
        row = cells.setdefault(column, {})
        for name, kind, path in inputs:
            print(f"eval: {column} on {name} ({path})", flush=True)
            t0 = time.time()
            try:
                if kind == "text":
                    totals = eval_text(model, tokenizer, dataclasses.replace(mcfg, inputs=path.split(",")), block,
                                       device)
                else:
                    totals = eval_shards(model, tokenizer, dataclasses.replace(mcfg, inputs=[], shards=path), device)
            except UserError as exc:
                if kind == "text":
                    raise
                row[name] = {"error": str(exc)}  # shards of another tokenizer: this model cannot read them
                continue
            row[name] = {**totals.figures(tokenizer.size), "seconds": round(time.time() - t0, 2)}
        del model
        gc.collect()
    result = {"table": {"inputs": [n for n, _, _ in inputs], "models": [c for c, _ in models], "cells": cells},
              "models": described, "config": to_dict(cfg)}
    if cfg.json_out:
        import json

        from ..files import write_atomic

        write_atomic(cfg.json_out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def format_table(r: dict) -> list[str]:
    t = r["table"]
    models, inputs, cells = t["models"], t["inputs"], t["cells"]

    def cell(m: str, i: str) -> str:
        c = cells[m].get(i, {})
        if c.get("bits_per_char") is None:
            return "n/a"
        text = f"{c['bits_per_char']:.4f}"
        if c.get("uniform_bits_per_char"):
            text += f" [{c['uniform_bits_per_char']:.2f}]"
        return text

    width = max([len(m) for m in models] + [16]) + 2
    first = max([len(i) for i in inputs] + [5]) + 2
    lines = ["bits per character (lower is better; in brackets the uniform baseline, log2 V x tokens per character)"]
    lines.append("input".ljust(first) + "".join(m.ljust(width) for m in models)
                 + (f"change vs {models[0]}" if len(models) > 1 else ""))
    for i in inputs:
        line = i.ljust(first) + "".join(cell(m, i).ljust(width) for m in models)
        base = cells[models[0]].get(i, {}).get("bits_per_char")
        if len(models) > 1 and base is not None:
            changes = []
            for m in models[1:]:
                v = cells[m].get(i, {}).get("bits_per_char")
                if v is not None:
                    changes.append(f"{m} {v - base:+.4f} ({100 * (v - base) / base:+.1f}%)")
            line += ", ".join(changes)
        lines.append(line.rstrip())
    for m in models:
        for i in inputs:
            if "error" in cells[m].get(i, {}):
                lines.append(f"n/a: {m} on {i}: {cells[m][i]['error']}")
    for m in models:
        d = r["models"][m]
        lines.append(f"{m}: {d['model']} (tokenizer {d['tokenizer']}, {d['vocab_size']:,} pieces)")
    return lines
