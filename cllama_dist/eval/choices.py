"""Multiple-choice evaluation in the C-Eval / CMMLU form: accuracy per subject and overall.

    cllama eval --model out/merged-7b --choices ceval/val/ --choices-dev ceval/dev/ --shots 5 --json-out mc.json

Input: CSV files with a header naming the columns question, A, B, C, D, answer (case-insensitive; C-Eval's
id and explanation columns and CMMLU's unnamed index column are ignored), one question a row. The subject
is the file name without its split suffix (computer_network_val.csv -> computer_network). Rows without an
answer in A-D (a test split) are skipped and counted.

Each question is put in C-Eval's own prompt form: a header naming the subject, the ``shots`` first dev
questions of that subject with their answers, then the question with its four options and ``答案：``. Each
option is scored by the model's log-likelihood of it after the prompt: its letter (the default, as C-Eval's
and CMMLU's evaluation scripts and lm-eval do), or its text (the summed log-likelihood of its tokens); the
most likely option is the model's answer. The same code serves a base, base + adapter or merged model
(eval/run.py loads them). Accuracy overall is given per question (micro) and as the mean over subjects
(macro, C-Eval's leaderboard convention).
"""

from __future__ import annotations

import csv
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..model.scoring import masked_nll
from ..progress import Progress

LETTERS = ("A", "B", "C", "D")
_SPLIT = re.compile(r"_(val|dev|test|train)$")


@dataclass
class Question:
    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # A-D
    where: str


def subject_of(path: Path) -> str:
    return _SPLIT.sub("", path.stem)


def csv_files(specs: list[str]) -> list[Path]:
    out: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.csv") if q.is_file())
            if not found:
                raise UserError(f"{p} holds no .csv files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"multiple-choice input not found: {p}")
    return out


def read_questions(path: Path, skipped: dict[str, int]) -> list[Question]:
    """The questions of one CSV file (rows without an A-D answer counted in ``skipped``)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        from ..files import os_error

        raise os_error(exc, path, "read") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    need = ["question", "a", "b", "c", "d", "answer"]
    missing = [n for n in need if n not in header]
    if missing:
        raise UserError(f"{path}:1: no column {', '.join(missing)} in the header {rows[0]} (C-Eval / CMMLU CSV: "
                        "question, A, B, C, D, answer)")
    col = {n: header.index(n) for n in need}
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise UserError(f"{path}:{line}: {len(row)} columns, the header has {len(header)}")
        answer = row[col["answer"]].strip().upper()
        if answer not in LETTERS:
            skipped["no_answer"] = skipped.get("no_answer", 0) + 1
            continue
        out.append(Question(subject_of(path), row[col["question"]].strip(),
                            tuple(row[col[k]].strip() for k in "abcd"), answer, f"{path}:{line}"))
    return out


def _format(q: Question, with_answer: bool) -> str:
    body = q.question + "\n" + "".join(f"{l}. {o}\n" for l, o in zip(LETTERS, q.options)) + "答案："
    return body + (q.answer + "\n\n" if with_answer else "")


def prompt_text(q: Question, dev: list[Question], shots: int) -> str:
    head = f"以下是中国关于{q.subject.replace('_', ' ')}考试的单项选择题，请选出其中的正确答案。\n\n"
    return head + "".join(_format(d, True) for d in dev[:shots]) + _format(q, False)


def continuation_ids(tokenizer, prompt: str, cont: str, prompt_ids: list[int]) -> list[int]:
    """The tokens ``cont`` adds after ``prompt``: from the joint encoding when the prompt's own tokens are its
    prefix (so the option is scored as the model would read it), else ``cont`` encoded alone."""
    joint = tokenizer.encode([prompt + cont])[0]
    if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        return joint[len(prompt_ids):]
    return tokenizer.encode([cont])[0]


@torch.no_grad()
def option_nll(model, tokenizer, prompt: str, conts: list[str], device, max_len: int) -> list[float]:
    """Summed negative log-likelihood of each continuation after the prompt (one padded batch)."""
    p_ids = tokenizer.encode([prompt])[0]
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    seqs, spans = [], []
    for c in conts:
        c_ids = continuation_ids(tokenizer, prompt, c, p_ids)
        ctx = (bos + p_ids)[-(max_len - len(c_ids)):]  # a too long prompt loses its beginning, never the option
        seqs.append(ctx + c_ids)
        spans.append((len(ctx), len(ctx) + len(c_ids)))
    n = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), n, dtype=torch.long)
    attn = torch.zeros(len(seqs), n, dtype=torch.long)
    scored = torch.zeros(len(seqs), n - 1, dtype=torch.bool)
    for i, (s, (a, b)) in enumerate(zip(seqs, spans)):
        x[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        scored[i, a - 1:b - 1] = True  # position t predicts token t + 1
    x, attn, scored = x.to(device), attn.to(device), scored.to(device)
    # Labels aligned with x, -100 but at the option's tokens: the model's loss forward scores them without
    # the full logits (model/scoring.py), the same NLL as from the logits.
    labels = torch.full_like(x, -100)
    labels[:, 1:] = torch.where(scored, x[:, 1:], labels[:, 1:])
    nll, _ = masked_nll(model, {"input_ids": x, "attention_mask": attn}, labels)
    return nll.double().cpu().tolist()


def evaluate_choices(cfg, model, tokenizer, device) -> dict:
    """Accuracy of ``model`` on the multiple-choice files of ``cfg.choices`` (an EvalConfig)."""
    t0 = time.time()
    skipped: dict[str, int] = {}
    questions = [q for f in csv_files(cfg.choices) for q in read_questions(f, skipped)]
    if not questions:
        raise UserError(f"no question with an answer in {cfg.choices} (test splits carry no answers: use val)")
    dev: dict[str, list[Question]] = {}
    if cfg.shots:
        for f in csv_files(cfg.choices_dev):
            dev.setdefault(subject_of(f), []).extend(read_questions(f, {}))
        lacking = sorted({q.subject for q in questions} - {s for s, d in dev.items() if len(d) >= cfg.shots})
        if lacking:
            raise UserError(f"--shots {cfg.shots}: no {cfg.shots} dev questions for subject(s) {', '.join(lacking[:5])} "
                            f"in {cfg.choices_dev} (files named SUBJECT_dev.csv)")
    if cfg.max_documents:
        questions = questions[:cfg.max_documents]
    max_len = getattr(model.config, "max_position_embeddings", 4096) or 4096
    per: dict[str, list[int]] = {}
    answers = []
    with Progress("multiple choice", total=len(questions), unit="questions") as bar:
        for q in questions:
            prompt = prompt_text(q, dev.get(q.subject, []), cfg.shots)
            conts = list(LETTERS) if cfg.choices_score == "letter" else list(q.options)
            nll = option_nll(model, tokenizer, prompt, conts, device, max_len)
            pick = LETTERS[min(range(4), key=lambda i: nll[i])]
            per.setdefault(q.subject, []).append(int(pick == q.answer))
            answers.append({"where": q.where, "answer": q.answer, "picked": pick,
                            "nll": [round(v, 4) for v in nll]})
            bar.update(1)
    subjects = {s: {"questions": len(v), "correct": sum(v), "accuracy": sum(v) / len(v)} for s, v in sorted(per.items())}
    total = sum(len(v) for v in per.values())
    correct = sum(sum(v) for v in per.values())
    return {"subjects": subjects, "questions": total, "correct": correct, "accuracy": correct / total,
            "macro_accuracy": sum(s["accuracy"] for s in subjects.values()) / len(subjects),
            "shots": cfg.shots, "score": cfg.choices_score, "skipped": skipped, "answers": answers,
            "seconds": round(time.time() - t0, 2)}


def format_choices(r: dict) -> list[str]:
    lines = [f"multiple choice ({r['shots']}-shot, by {r['score']}): {r['correct']:,} of {r['questions']:,} = "
             f"{100 * r['accuracy']:.1f}% (mean over {len(r['subjects'])} subjects {100 * r['macro_accuracy']:.1f}%)"]
    for s, v in r["subjects"].items():
        lines.append(f"  {s:<32} {v['correct']:>5} / {v['questions']:<5} {100 * v['accuracy']:5.1f}%")
    if r["skipped"]:
        lines.append(f"  skipped: {r['skipped']}")
    return lines
