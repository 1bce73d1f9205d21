"""Instruction readers: both formats, field names, every skip reason, strict errors naming file:line."""

import gzip
import json

import pytest

from cllama_dist.errors import UserError
from cllama_dist.sft.records import (SKIP_REASONS, Conversation, Fields, ReadStats, read_alpaca, read_chat,
                                     read_conversations, single_turn)


def jl(path, lines):
    """Write raw lines (bytes or str; objects are dumped as JSON)."""
    with open(path, "wb") as f:
        for x in lines:
            if isinstance(x, (dict, list)):
                x = json.dumps(x, ensure_ascii=False)
            f.write((x.encode("utf-8") if isinstance(x, str) else x) + b"\n")
    return path


def u(c):
    return {"role": "user", "content": c}


def a(c):
    return {"role": "assistant", "content": c}


def test_alpaca_jsonl_and_the_papers_input_rule(tmp_path):
    f = jl(tmp_path / "a.jsonl", [
        {"instruction": "翻译成英文", "input": "你好", "output": "Hello"},
        {"instruction": "一年有几个月？", "input": "", "output": "十二个月"},
        {"instruction": "一年有几个月？", "output": "十二个月"},          # no input field: fine
        {"instruction": "一年有几个月？", "input": None, "output": "十二个月"},
        {"instruction": "x", "input": " ", "output": "y", "extra": 1},   # the paper appends a blank input too
        "",                                                              # blank lines are not records
    ])
    stats = ReadStats()
    got = list(read_alpaca(f, stats=stats))
    assert [c.turns for c in got] == [(("翻译成英文\n你好", "Hello"),), (("一年有几个月？", "十二个月"),),
                                      (("一年有几个月？", "十二个月"),), (("一年有几个月？", "十二个月"),),
                                      (("x\n ", "y"),)]
    assert all(c.system is None for c in got)
    assert got[0].where == f"{f}:1" and got[4].where == f"{f}:5"
    assert (stats.read, stats.kept, sum(stats.skipped.values())) == (5, 5, 0)
    assert got[0] == single_turn("翻译成英文", "Hello", "你好")


def test_field_names_are_configurable(tmp_path):
    f = jl(tmp_path / "b.jsonl", [{"q": "问", "ctx": "上下文", "a": "答", "sys": "你是助手"},
                                  {"q": "问", "a": "答", "sys": "  "}])
    fields = Fields(instruction="q", input="ctx", output="a", system="sys")
    got = list(read_alpaca(f, fields))
    assert got == [Conversation((("问\n上下文", "答"),), "你是助手"), Conversation((("问", "答"),), None)]
    # The default names find nothing in these records.
    stats = ReadStats()
    assert list(read_alpaca(f, stats=stats)) == []
    assert stats.skipped["missing_field"] == 2


def test_alpaca_json_array_is_read_with_line_numbers(tmp_path):
    f = tmp_path / "data.json"
    records = [{"instruction": f"第{i}题", "input": "", "output": f"答案{i}"} for i in range(3)]
    f.write_text("\ufeff[\n" + ",\n".join(json.dumps(r, ensure_ascii=False, indent=1) for r in records) + "\n]\n",
                 encoding="utf-8")
    got = list(read_alpaca(f))
    assert [c.turns[0] for c in got] == [(f"第{i}题", f"答案{i}") for i in range(3)]
    assert [c.where.rsplit(":", 1)[1] for c in got] == ["2", "7", "12"]
    # A bad record inside an array is skipped like a bad line; broken syntax cannot be skipped past.
    f.write_text('[{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}, 5]', encoding="utf-8")
    stats = ReadStats()
    assert len(list(read_alpaca(f, stats=stats))) == 1
    assert (stats.skipped["non_string"], stats.skipped["malformed_record"]) == (1, 1)
    f.write_text('[\n{"instruction": "a", "output": "b"},\n{"instruction": "a" "output": "b"}\n]', encoding="utf-8")
    with pytest.raises(UserError, match=r"data\.json:3: malformed JSON"):
        list(read_alpaca(f))
    f.write_text("[]", encoding="utf-8")
    assert list(read_alpaca(f)) == []
    # Invalid UTF-8 inside one record of an array skips that record only.
    f.write_bytes(b'[{"instruction": "a", "output": "b"}, {"instruction": "\xff", "output": "b"}]')
    stats = ReadStats()
    assert len(list(read_alpaca(f, stats=stats))) == 1 and stats.skipped["invalid_utf8"] == 1


def test_chat_jsonl_multi_turn_and_system(tmp_path):
    f = jl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "system", "content": "简洁"}, u("你好"), a("你好！"), u("再见"), a("再见！")]},
        {"messages": [u("1+1"), a("2")]},
        {"messages": [{"role": "system", "content": ""}, u("x"), a("y")]},
    ])
    got = list(read_chat(f))
    assert got[0] == Conversation((("你好", "你好！"), ("再见", "再见！")), "简洁")
    assert got[0].messages()[0] == {"role": "system", "content": "简洁"}
    assert got[1] == Conversation((("1+1", "2"),))
    assert got[2].system is None  # a blank system text reads as the template's default
    assert list(read_conversations(f)) == got


def test_every_skip_reason_is_counted_and_strict_names_the_line(tmp_path):
    good_a = {"instruction": "问", "output": "答"}
    good_c = {"messages": [u("问"), a("答")]}
    cases = [  # (line, reason)
        (b'{"instruction": "\xff\xfe", "output": "x"}', "invalid_utf8"),
        ('{"instruction": "\\udc80", "output": "x"}', "invalid_utf8"),  # a lone surrogate, escaped
        ('{"instruction": "a", "output": ', "malformed_json"),
        ("[1, 2]", "malformed_record"),
        ({"messages": "hi"}, "malformed_record"),
        ({"output": "答"}, "missing_field"),
        ({"instruction": "问"}, "missing_field"),
        ({"instruction": "问", "output": None}, "missing_field"),
        ({"messages": [{"content": "x"}, a("y")]}, "missing_field"),
        ({"messages": [u("x"), {"role": "assistant"}]}, "missing_field"),
        ({"instruction": ["问"], "output": "答"}, "non_string"),
        ({"instruction": "问", "output": 42}, "non_string"),
        ({"messages": [u(3), a("y")]}, "non_string"),
        ({"instruction": " ", "input": "", "output": "答"}, "empty_prompt"),
        ({"messages": [u(""), a("y")]}, "empty_prompt"),
        ({"instruction": "问", "output": "  \n"}, "empty_response"),
        ({"messages": [u("x"), a("")]}, "empty_response"),
        ({"messages": [{"role": "human", "content": "x"}, a("y")]}, "unknown_role"),
        ({"messages": [a("y"), u("x"), a("y")]}, "role_order"),                     # assistant first
        ({"messages": [u("x"), u("x"), a("y")]}, "role_order"),                     # two users in a row
        ({"messages": [u("x"), a("y"), u("x")]}, "role_order"),                     # ends with user
        ({"messages": [u("x"), {"role": "system", "content": "s"}, a("y")]}, "role_order"),  # system later
        ({"messages": []}, "role_order"),                                           # no turns
    ]
    lines = []
    for line, _ in cases:
        lines += [good_a, good_c, line]
    f = jl(tmp_path / "bad.jsonl", lines)
    stats = ReadStats()
    got = list(read_conversations(f, stats=stats))
    assert len(got) == 2 * len(cases)
    expected = {r: sum(1 for _, reason in cases if reason == r) for r in SKIP_REASONS}
    assert stats.as_dict()["skipped"] == expected
    assert set(expected) == set(SKIP_REASONS) and all(expected.values())
    assert (stats.read, stats.kept) == (3 * len(cases), 2 * len(cases))
    assert stats.first["invalid_utf8"] == f"{f}:3"
    # strict: the first bad record raises, naming file and line.
    with pytest.raises(UserError, match=r"bad\.jsonl:3: .*UTF-8"):
        list(read_conversations(f, strict=True))
    for k, (line, reason) in enumerate(cases):
        g = jl(tmp_path / f"one{k}.jsonl", [good_a, good_c, good_c, line])
        with pytest.raises(UserError, match=rf"one{k}\.jsonl:4: "):
            list(read_conversations(g, strict=True))


def test_formats_are_forced_or_detected(tmp_path):
    f = jl(tmp_path / "mix.jsonl", [{"instruction": "问", "output": "答"}, {"messages": [u("问"), a("答")]}])
    stats = ReadStats()
    assert len(list(read_alpaca(f, stats=stats))) == 1 and stats.skipped["missing_field"] == 1
    stats = ReadStats()
    assert len(list(read_chat(f, stats=stats))) == 1 and stats.skipped["missing_field"] == 1
    assert len(list(read_conversations(f))) == 2
    g = jl(tmp_path / "conv.jsonl", [{"conversation": [u("问"), a("答")]}])
    assert len(list(read_chat(g, messages_key="conversation"))) == 1
    with pytest.raises(UserError, match="unknown instruction format"):
        list(read_conversations(f, "sharegpt"))
    with pytest.raises(UserError, match="not found"):
        list(read_alpaca(tmp_path / "missing.jsonl"))


def test_jsonl_is_streamed_and_gzip_is_read(tmp_path):
    records = [{"instruction": f"问{i}", "output": f"答{i}"} for i in range(1000)]
    f = tmp_path / "big.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    it = read_alpaca(f)
    first = next(it)  # a generator: the first record arrives before the file is read to the end
    assert first.turns == (("问0", "答0"),) and first.where.endswith(":1")
    assert len(list(it)) == 999
