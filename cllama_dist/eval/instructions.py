"""Held-out instructions: the share a model answers exactly, greedily, through its chat template.

    cllama eval --model out/merged --instructions heldout.jsonl [--template alpaca] [--json-out r.json]

    from cllama_dist.eval.config import EvalConfig
    from cllama_dist.eval.instructions import evaluate_instructions
    evaluate_instructions(EvalConfig(model="out/merged", instructions="heldout.jsonl"))

Records: Alpaca style (``instruction``, ``input``, ``output``; a non-empty input is appended to the
instruction after a newline, the paper's rule) or chat (``messages``: the last assistant message is
the expected answer, the messages before it the conversation it answers). Bad records are skipped and
counted as the SFT readers count them (sft/records.py), or with ``strict`` name file and line. A
record's optional ``task`` field (e.g. "copy", "reverse") groups the counts.

What is compared, exactly: the prompt is ``sft.encode.encode_prompt`` of the record's conversation up
to the answer, through the template (the ids training saw before that answer); the answer is generated
greedily (no sampling) until EOS, or until it has as many tokens as the expected answer has UTF-8
bytes plus 8 (no longer answer can match: every token but whitespace-only ones spells at least one
byte), and decoded with SentencePiece (byte-fallback pieces become characters). The answer and the
expected output are each stripped with Python's ``str.strip()`` (Unicode whitespace at both ends, the
ideographic space U+3000 included) and compared as strings: equal or not, no other normalisation (no
NFKC, no punctuation or case folding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..sft.templates import Template

COMPARED = ("the greedy answer (until EOS, decoded with SentencePiece) and the expected output, each with "
            "str.strip() (whitespace at both ends), compared as strings; nothing else normalised")
SLACK_TOKENS = 8


@dataclass(frozen=True)
class Item:
    """One held-out record: the conversation to answer (ending with a user message) and the expected answer."""

    messages: list
    expected: str
    task: str = ""
    where: str = ""

    @property
    def instruction(self) -> str:
        return self.messages[-1]["content"]


def same(answer: str, expected: str) -> bool:
    """The exact-match rule: equal after str.strip() of each."""
    return answer.strip() == expected.strip()


def read_items(path: str | Path, *, strict: bool = False):
    """(items, ReadStats) of an Alpaca-style or chat JSON / JSON Lines file (decided per record)."""
    from ..sft import records

    stats = records.ReadStats()
    items: list[Item] = []
    # The readers' own record parsing, so that held-out records are read exactly as training records are;
    # the raw object is needed too, for its task field.
    for obj, where in records.read_objects(path, strict, stats):
        try:
            is_chat = isinstance(obj, dict) and "messages" in obj
            conv = records.chat_record(obj) if is_chat else records.alpaca_record(obj)
        except records.BadRecord as s:
            records.count_skip(stats, strict, s.reason, where, s.detail)
            continue
        stats.kept += 1
        msgs = conv.messages()
        task = obj.get("task") if isinstance(obj.get("task"), str) else ""
        items.append(Item(msgs[:-1], msgs[-1]["content"], task, where))
    if not items:
        raise UserError(f"{path}: no usable instruction record (skipped: "
                        f"{ {k: v for k, v in stats.as_dict()['skipped'].items() if v} or 'none'})")
    return items, stats


def exact_match(items: list[Item], answer: Callable[[Item], str]) -> dict:
    """The exact-match figures of ``answer`` (one call per item) on ``items``: overall, per task, and each answer."""
    rows, by_task = [], {}
    for it in items:
        got = answer(it)
        ok = same(got, it.expected)
        rows.append({"where": it.where, "task": it.task, "instruction": it.instruction, "expected": it.expected,
                     "answer": got, "exact": ok})
        t = by_task.setdefault(it.task, {"records": 0, "exact": 0})
        t["records"] += 1
        t["exact"] += ok
    for t in by_task.values():
        t["share"] = t["exact"] / t["records"]
    exact = sum(r["exact"] for r in rows)
    return {"records": len(rows), "exact": exact, "share": exact / len(rows) if rows else 0.0,
            "by_task": dict(sorted(by_task.items())), "compared": COMPARED, "answers": rows}


def budget(expected: str) -> int:
    """Tokens an answer may have: no answer longer than this can equal ``expected`` after stripping."""
    return len(expected.strip().encode("utf-8")) + SLACK_TOKENS


def greedy_answerer(model, sp, template: Template, device) -> Callable[[Item], str]:
    """An answer function: the greedy answer of ``model`` through ``template``, decoded with SentencePiece."""
    from ..inference.generate import Sampling, generate_ids
    from ..sft.encode import encode_prompt

    config = getattr(model, "config", None)
    max_positions = getattr(config, "max_position_embeddings", None) or None

    def answer(it: Item) -> str:
        ids = encode_prompt(it.messages, template, sp)
        room = budget(it.expected)
        if max_positions:
            room = min(room, max_positions - len(ids))
            if room < 1:
                raise UserError(f"{it.where}: the prompt is {len(ids):,} tokens, the model's context "
                                f"{max_positions:,}: no room for an answer")
        new, _ = generate_ids(model, ids, sp.eos_id(), Sampling(room), device)
        return sp.decode(new)

    return answer


def evaluate_instructions(cfg, model=None, tokenizer=None, device=None,
                          answer: Callable[[Item], str] | None = None, template: Template | None = None) -> dict:
    """The exact-match share of ``cfg.instructions`` (an EvalConfig): loads the model unless given one.

    ``answer`` replaces the model (a function from an Item to its answer text: tests, other generators);
    ``template`` replaces ``cfg.template``'s choice.
    """
    from ..sft.templates import pick_template

    if not cfg.instructions:
        raise UserError("no held-out instructions: set instructions (--instructions FILE.jsonl)")
    if template is None:
        template = pick_template(cfg.template, cfg.model, cfg.adapter, cfg.tokenizer, required=True)
    items, stats = read_items(cfg.instructions, strict=cfg.strict)
    if cfg.max_documents:
        items = items[:cfg.max_documents]
    if answer is None:
        if model is None:
            from ..inference.load import load_model

            model, tokenizer, _, device = load_model(cfg)
        if tokenizer.sp is None:
            raise UserError(f"--instructions needs a SentencePiece tokenizer (tokenizer.model) in {tokenizer.path}")
        answer = greedy_answerer(model, tokenizer.sp, template, device)
    t0 = time.time()
    result = exact_match(items, answer)
    result.update(file=str(cfg.instructions), template=template.describe(), seconds=round(time.time() - t0, 2),
                  skipped={k: v for k, v in stats.as_dict()["skipped"].items() if v})
    return result


def format_instructions(r: dict) -> list[str]:
    lines = [f"exact      {r['exact']:,} of {r['records']:,} held-out instructions answered exactly "
             f"({100 * r['share']:.1f}%), template {r['template']['name']}, {r['file']}"]
    tasks = {k: v for k, v in r["by_task"].items() if k}
    if tasks:
        lines.append("           " + "   ".join(f"{k} {v['exact']}/{v['records']}" for k, v in tasks.items()))
    return lines
