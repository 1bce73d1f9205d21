"""Evaluate a model on held-out text: loss, perplexity, and bits per character.

    cllama eval --model BASE [--adapter ADAPTER] --inputs heldout.jsonl [--generate [--template auto|none|NAME|FILE]]
    cllama eval --model MERGED --shards shards/ [--split validation]
    cllama eval --model MERGED --instructions heldout_instructions.jsonl      (exact-match share: instructions.py)

Bits per character, and how each document is scored: perplexity.py. Loading the model, its tokenizer and
an adapter: inference/load.py; generating: inference/generate.py.
"""

from __future__ import annotations

import json
import time

import torch

from ..config import to_dict
from ..errors import UserError
from ..files import check_file_output, check_not_input, write_atomic
from ..inference.generate import Sampling, continue_ids, generate_ids
from ..inference.load import Tokenizer, load_model
from ..sft.encode import encode_prompt, user_turn
from ..sft.templates import pick_template
from .config import EvalConfig
from .perplexity import eval_shards, eval_text


# --------------------------------------------------------------------------------------------------
# Generation.


def generate(model, tokenizer: Tokenizer, cfg: EvalConfig, device: torch.device, template=None) -> list[dict]:
    """Continuations of ``cfg.prompts``: raw (BOS + the prompt, exactly max_new_tokens sampled, the speed
    figure), or, with a chat template, answers to each prompt as a single-turn instruction (the ids training
    saw before an answer, ``sft.encode.encode_prompt``), ending at EOS."""
    torch.manual_seed(cfg.seed)
    out = []
    for prompt in cfg.prompts:
        if template is not None:
            out.append(_answer(model, tokenizer, cfg, device, template, prompt))
            continue
        ids = tokenizer.encode([prompt])[0]
        if tokenizer.bos_id >= 0:
            ids = [tokenizer.bos_id] + ids
        new, seconds = continue_ids(model, ids, Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p), device)
        out.append({"prompt": prompt, "continuation": tokenizer.decode(new), "new_tokens": len(new),
                    "seconds": seconds, "tokens_per_second": len(new) / seconds})
    return out


def _answer(model, tokenizer: Tokenizer, cfg: EvalConfig, device: torch.device, template, prompt: str) -> dict:
    ids = encode_prompt(user_turn(prompt), template, tokenizer.sp)
    room = cfg.max_new_tokens
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        room = min(room, max_pos - len(ids))
        if room < 1:
            raise UserError(f"--prompts {prompt[:40]!r}: the prompt is {len(ids):,} tokens through template "
                            f"{template.name}, the model's context {max_pos:,}")
    t0 = time.perf_counter()
    new, stop = generate_ids(model, ids, tokenizer.sp.eos_id(), Sampling(room, cfg.temperature, cfg.top_p), device)
    seconds = time.perf_counter() - t0
    return {"prompt": prompt, "continuation": tokenizer.decode(new), "new_tokens": len(new), "stop": stop,
            "template": template.name, "prompt_tokens": len(ids), "seconds": seconds,
            "tokens_per_second": len(new) / seconds}


def templates_for(cfg: EvalConfig):
    """(template for --generate or None, template for --instructions or None), chosen before the model loads."""
    gen = pick_template(cfg.template, cfg.model, cfg.adapter, cfg.tokenizer, required=False) if cfg.generate else None
    inst = (pick_template(cfg.template, cfg.model, cfg.adapter, cfg.tokenizer, required=True)
            if cfg.instructions else None)
    return gen, inst


# --------------------------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig) -> dict:
    if cfg.text or cfg.shard_sets:
        from .table import evaluate_table

        check_outputs(cfg)
        return evaluate_table(cfg)
    check_outputs(cfg)
    gen_template, inst_template = templates_for(cfg)  # a missing template is refused before the model loads
    model, tokenizer, what, device = load_model(cfg)
    if (gen_template or inst_template) and tokenizer.sp is None:
        raise UserError(f"a chat template needs a SentencePiece tokenizer (tokenizer.model) in {tokenizer.path}: "
                        "prompts are encoded as training encoded them; pass --tokenizer")
    result = {"model": what, "tokenizer": str(tokenizer.path), "vocab_size": tokenizer.size, "device": str(device)}
    if cfg.inputs or cfg.shards:
        max_pos = getattr(model.config, "max_position_embeddings", cfg.block_size) or cfg.block_size
        block = min(cfg.block_size, max_pos)
        t0 = time.time()
        totals = eval_text(model, tokenizer, cfg, block, device) if cfg.inputs else eval_shards(model, tokenizer, cfg, device)
        result.update({"data": cfg.shards or cfg.inputs, "block_size": block, **totals.figures(tokenizer.size),
                       "seconds": round(time.time() - t0, 2)})
    if cfg.generate:
        result["generations"] = generate(model, tokenizer, cfg, device, gen_template)
    if cfg.instructions:
        from .instructions import evaluate_instructions

        result["instructions"] = evaluate_instructions(cfg, model, tokenizer, device, template=inst_template)
    if cfg.choices:
        from .choices import evaluate_choices

        result["choices"] = evaluate_choices(cfg, model, tokenizer, device)
    result["config"] = to_dict(cfg)
    if cfg.json_out:
        write_atomic(cfg.json_out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def check_outputs(cfg: EvalConfig) -> None:
    """Before any work: the JSON output is a file path that touches no input."""
    if cfg.json_out:
        check_file_output(cfg.json_out, "eval JSON")
        check_not_input(cfg.json_out, {"model": cfg.model, "adapter": cfg.adapter, "tokenizer": cfg.tokenizer,
                                       "corpus": cfg.inputs, "shards": cfg.shards, "instructions": cfg.instructions,
                                       "multiple-choice files": list(cfg.choices) + list(cfg.choices_dev),
                                       "named inputs": [p for i in list(cfg.text) + list(cfg.shard_sets)
                                                        for p in i.partition("=")[2].split(",")],
                                       "compared models": [p for i in cfg.compare
                                                           for p in i.partition("=")[2].split("+")]},
                        "eval JSON")


def format_result(r: dict) -> str:
    if "table" in r:
        from .table import format_table

        return "\n".join(format_table(r))
    lines = [f"model      {r['model']}", f"tokenizer  {r['tokenizer']} ({r['vocab_size']:,} pieces)"]
    if "loss" in r:
        unit = "blocks" if isinstance(r.get("data"), str) else "documents"  # a shards folder, or text inputs
        lines += [(f"data       {r['documents']:,} {unit}, {r['tokens']:,} tokens "
                   f"predicted, window {r['block_size']}"),
                  f"loss       {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}"]
    if r.get("bits_per_char") is not None:
        lines.append(f"bits/char  {r['bits_per_char']:.4f}   bits/byte {r['bits_per_byte']:.4f}   "
                     f"tokens/char {r['tokens_per_char']:.3f}   ({r['characters']:,} characters)")
        if r.get("uniform_bits_per_char"):
            lines.append(f"baseline   {r['uniform_bits_per_char']:.4f} bits/char for a uniform guess (log2 "
                         f"{r['vocab_size']:,} x {r['tokens_per_char']:.3f} tokens/char): the model saves "
                         f"{100 * (1 - r['bits_per_char'] / r['uniform_bits_per_char']):.1f}% of it")
    for g in r.get("generations", []):
        how = f", template {g['template']}, stop: {g['stop']}" if g.get("template") else ""
        lines.append(f"generate   {g['prompt']}|{g['continuation']}  ({g['new_tokens']} tokens, "
                     f"{g['tokens_per_second']:.1f} tokens/s{how})")
    if "instructions" in r:
        from .instructions import format_instructions

        lines += format_instructions(r["instructions"])
    if "choices" in r:
        from .choices import format_choices

        lines += format_choices(r["choices"])
    return "\n".join(lines)
