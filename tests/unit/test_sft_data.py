"""The demo's instruction set: in sync with its generator, readable, held-out answers exactly right."""

import collections
import json
import subprocess
import sys

import sentencepiece as spm

from cllama_dist.sft.encode import EncodeStats, encode_all
from cllama_dist.sft.records import ReadStats, read_conversations
from cllama_dist.sft.shipped import FILES, HELDOUT, TRAIN, heldout_file, instructions_dir, train_files
from cllama_dist.sft.templates import builtin

D = instructions_dir()


def records(name):
    return [json.loads(line) for line in (D / name).read_text(encoding="utf-8").splitlines()]


def test_mechanical_files_are_the_generators_output():
    r = subprocess.run([sys.executable, str(D / "generate.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_file_reads_cleanly_in_its_format():
    for name, fmt in FILES.items():
        stats = ReadStats()
        convs = list(read_conversations(D / name, fmt, strict=True, stats=stats))
        assert stats.kept == stats.read == len(records(name)) == len(convs) > 0
    assert [p.name for p in train_files()] == list(TRAIN) and heldout_file().name == HELDOUT


def test_sizes_and_counts():
    total = sum(p.stat().st_size for p in D.iterdir() if p.is_file())
    assert total < 300_000
    general = records("general.jsonl")
    dialogues = records("dialogues.jsonl")
    handwritten_pairs = len(general) + sum(sum(m["role"] == "user" for m in d["messages"]) for d in dialogues)
    assert len(general) >= 200 and handwritten_pairs >= 250
    assert len(collections.Counter(r["task"] for r in general)) >= 7
    assert sum(len([m for m in d["messages"] if m["role"] == "user"]) > 1 for d in dialogues) >= 20
    assert sum(d["messages"][0]["role"] == "system" for d in dialogues) >= 3
    assert len(records(HELDOUT)) >= 40
    # Short, so that a tiny model on a CPU can learn from them.
    texts = [r["instruction"] + r["input"] for r in general] + [r["output"] for r in general]
    texts += [m["content"] for d in dialogues for m in d["messages"]]
    assert max(map(len, texts)) < 200 and sum(len(t) < 100 for t in texts) >= 0.97 * len(texts)


def _argument(r):
    ins = r["instruction"]
    if r["input"]:
        return r["input"]
    for sep in ("：", "？"):
        if sep in ins:
            return ins.split(sep, 1)[1]
    raise AssertionError(ins)


def _check(task, x):
    """An independent statement of each mechanical task's answer."""
    nums = [int(t) for t in x.split()] if task in ("sort", "max") else None
    return {
        "copy": lambda: x,
        "reverse": lambda: "".join(reversed(x)),
        "sort": lambda: " ".join(map(str, sorted(nums))),
        "upper": lambda: x.upper(),
        "lower": lambda: x.lower(),
        "repeat3": lambda: f"{x}、{x}、{x}",
        "first_char": lambda: x[:1],
        "max": lambda: str(max(nums)),
        "count": lambda: str(len(x)),
        "add": lambda: str(sum(int(t) for t in x.split("+"))),
    }[task]()


def test_mechanical_answers_are_exact_and_held_out_is_unseen():
    train = records("mechanical_train.jsonl")
    held = records(HELDOUT)
    for r in train + held:
        assert r["output"] == _check(r["task"], _argument(r)), r
    seen = {(r["task"], _argument(r)) for r in train}
    for c in records("mechanical_chat.jsonl"):
        first = c["messages"][1] if c["messages"][0]["role"] == "system" else c["messages"][0]
        t1 = c["task"].split("+")[0]
        seen.add((t1, first["content"].split("：", 1)[1]))
    assert not [r for r in held if (r["task"], _argument(r)) in seen]
    train_prompts = {r["instruction"] + "\n" + r["input"] for name in ("general.jsonl", "mechanical_train.jsonl")
                     for r in records(name)}
    assert not [r for r in held if r["instruction"] + "\n" + r["input"] in train_prompts]
    assert set(collections.Counter(r["task"] for r in held)) == {r["task"] for r in train}


def test_everything_fits_a_small_context(tiny_merged):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    for name in FILES:
        for template in ("alpaca", "llama2"):
            stats = EncodeStats()
            out = list(encode_all(read_conversations(D / name, FILES[name]), builtin(template), sp, 256,
                                  overflow="skip", stats=stats))
            assert stats.kept == len(out) == len(records(name)) and stats.as_dict()["skipped"]["too_long"] == 0
