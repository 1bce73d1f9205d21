"""cllama eval --instructions (exact-match share) and --generate through a chat template."""

import json
import shutil

import pytest
import sentencepiece as spm
import torch

from cllama_dist import cli
from cllama_dist.errors import UserError
from cllama_dist.eval import evaluate
from cllama_dist.eval.config import EvalConfig
from cllama_dist.eval.instructions import budget, evaluate_instructions, exact_match, read_items
from cllama_dist.sft import templates
from cllama_dist.sft.encode import encode_prompt, user_turn

from ..conftest import TINY_LLAMA, write_jsonl

RECORDS = [
    {"instruction": "复制这句话：学校很干净。", "input": "", "output": "学校很干净。", "task": "copy"},
    {"instruction": "把下面的词倒过来。", "input": "北京", "output": "京北", "task": "reverse"},
    {"instruction": "复制这句话：我爱北京。", "input": "", "output": "  我爱北京。 ", "task": "copy"},
    {"instruction": "bad: empty output", "input": "", "output": "   ", "task": "copy"},
    {"messages": [{"role": "user", "content": "把 abc 变成大写"}, {"role": "assistant", "content": "ABC"},
                  {"role": "user", "content": "再变回小写"}, {"role": "assistant", "content": "abc"}],
     "task": "case"},
    {"instruction": "复制这句话：天很蓝。", "output": "天很蓝。", "task": "copy"},
]
# The fake model's answers, by the last user message, and whether each matches (checked by hand):
FAKE = {
    "复制这句话：学校很干净。": ("\n学校很干净。\u3000", True),  # whitespace at both ends (U+3000 too) is stripped
    "把下面的词倒过来。\n北京": ("京北", True),  # input appended after a newline, as in training
    "复制这句话：我爱北京。": ("我爱北京", False),  # the full stop is missing
    "再变回小写": ("ABC", False),  # case is not folded
    "复制这句话：天很蓝。": ("天很蓝。", True),
}


@pytest.fixture(scope="module")
def sp(tiny_merged):
    return spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))


@pytest.fixture(scope="module")
def tok_with_template(tmp_path_factory, tiny_merged):
    folder = tmp_path_factory.mktemp("tok") / "alpaca"
    shutil.copytree(tiny_merged, folder)
    templates.install_chat_template(folder, templates.builtin("alpaca"))
    return folder


def test_exact_match_by_hand(tmp_path, tok_with_template):
    path = write_jsonl(tmp_path / "held.jsonl", RECORDS)
    items, stats = read_items(path)
    assert stats.as_dict()["skipped"]["empty_response"] == 1 and len(items) == 5
    chat = items[3]
    assert chat.messages[:2] == [{"role": "user", "content": "把 abc 变成大写"}, {"role": "assistant", "content": "ABC"}]
    assert chat.expected == "abc" and chat.where.endswith(":5")
    r = exact_match(items, lambda it: FAKE[it.instruction][0])
    assert [a["exact"] for a in r["answers"]] == [FAKE[it.instruction][1] for it in items]
    assert (r["records"], r["exact"], r["share"]) == (5, 3, 0.6)
    assert r["by_task"] == {"case": {"records": 1, "exact": 0, "share": 0.0},
                            "copy": {"records": 3, "exact": 2, "share": 2 / 3},
                            "reverse": {"records": 1, "exact": 1, "share": 1.0}}
    # From Python with a config object, as the demo calls it (the fake replaces the model: nothing is loaded).
    cfg = EvalConfig(model=str(tok_with_template), instructions=str(path), max_documents=2)
    r = evaluate_instructions(cfg, answer=lambda it: FAKE[it.instruction][0])
    assert (r["records"], r["exact"]) == (2, 2) and r["template"]["name"] == "alpaca"
    assert r["skipped"] == {"empty_response": 1} and "str.strip()" in r["compared"]
    with pytest.raises(UserError, match=r"held.jsonl:4: field 'output' is empty"):
        read_items(path, strict=True)


def test_budget_covers_any_tokenization_of_the_expected_answer(sp):
    for text in ("学校很干净。", "😀😀 龘", "abc", " 京北 "):
        assert len(sp.encode(text.strip())) + 1 <= budget(text)  # + EOS; byte fallback included
        assert budget(text) == len(text.strip().encode("utf-8")) + 8


@pytest.fixture(scope="module")
def stopping_model(tmp_path_factory, tiny_merged, sp):
    """A random tiny LLaMA whose greedy answer to RECORDS[0] ends with EOS after a few tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=sp.get_piece_size(), **TINY_LLAMA)).eval()
    prompt = encode_prompt(user_turn(RECORDS[0]["instruction"]), templates.builtin("alpaca"), sp)
    first = greedy(model, prompt, sp.eos_id(), 4)[0]
    with torch.no_grad():
        model.lm_head.weight[sp.eos_id()] = 3 * model.lm_head.weight[first[3]]
    folder = tmp_path_factory.mktemp("model") / "m"
    model.save_pretrained(folder)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_merged / name, folder / name)
    templates.install_chat_template(folder, templates.builtin("alpaca"))
    return folder, model


def greedy(model, ids, eos, n):
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if t == eos:
                return out, "eos"
            out.append(t)
    return out, "max_new_tokens"


def test_greedy_answers_through_the_cli(stopping_model, sp, tmp_path, capsys):
    folder, model = stopping_model
    alpaca = templates.builtin("alpaca")
    prompt = encode_prompt(user_turn(RECORDS[0]["instruction"]), alpaca, sp)
    want, stop = greedy(model, prompt, sp.eos_id(), 40)
    assert stop == "eos" and want  # a non-empty answer that ends at EOS
    answer = sp.decode(want)
    records = [{**RECORDS[0], "output": f" {answer} "}, {**RECORDS[1], "output": "不是这个"}]
    path = write_jsonl(tmp_path / "held.jsonl", records)
    code = cli.main(["eval", "--model", str(folder), "--instructions", str(path), "--json-out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())["instructions"]
    assert (r["records"], r["exact"], r["share"]) == (2, 1, 0.5)
    assert r["answers"][0]["answer"] == answer and r["by_task"]["copy"]["exact"] == 1
    assert "1 of 2 held-out instructions answered exactly (50.0%), template alpaca" in out
    assert "copy 1/1   reverse 0/1" in out


def test_generate_through_the_template(stopping_model, sp, tiny_model_dir, tiny_base, tmp_path):
    folder, model = stopping_model
    text = write_jsonl(tmp_path / "d.jsonl", [{"text": "中文的分词。"}])
    prompt = RECORDS[0]["instruction"]
    r = evaluate(EvalConfig(model=str(folder), inputs=[str(text)], generate=True, prompts=[prompt], temperature=0,
                            max_new_tokens=40))  # template auto: the model's own
    (g,) = r["generations"]
    want, stop = greedy(model, encode_prompt(user_turn(prompt), templates.builtin("alpaca"), sp), sp.eos_id(), 40)
    assert g["template"] == "alpaca" and g["stop"] == stop == "eos" and g["continuation"] == sp.decode(want)
    assert g["new_tokens"] == len(want) and "bits_per_char" in r
    # none: raw continuation, exactly max_new_tokens long, as before.
    raw = evaluate(EvalConfig(model=str(folder), inputs=[str(text)], generate=True, prompts=[prompt],
                              template="none", max_new_tokens=5))["generations"][0]
    assert "template" not in raw and raw["new_tokens"] == 5
    # A model without a template: auto continues raw text; --instructions is refused before loading anything.
    plain = evaluate(EvalConfig(model=str(tiny_model_dir), tokenizer=str(tiny_base), inputs=[str(text)],
                                generate=True, prompts=["中国"], max_new_tokens=3))["generations"][0]
    assert "template" not in plain
    held = write_jsonl(tmp_path / "h.jsonl", RECORDS[:1])
    with pytest.raises(UserError, match="no chat template.*--template alpaca"):
        evaluate(EvalConfig(model=str(tmp_path), instructions=str(held)))
    # Only --instructions is enough; --inputs with --shards is not.
    EvalConfig(model="m", instructions="h.jsonl")
    with pytest.raises(UserError, match="not both"):
        EvalConfig(model="m", instructions="h.jsonl", inputs=["a"], shards="s")
