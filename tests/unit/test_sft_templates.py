"""Templates: the paper's strings character for character, segments, Jinja templates from files and tokenizers."""

import json

import pytest

from cllama_dist.errors import UserError
from cllama_dist.sft import templates as T
from cllama_dist.sft.records import Conversation, single_turn

# The paper's prompt templates, copied as literal data from its code:
# ymcui/Chinese-LLaMA-Alpaca, scripts/training/build_dataset.py, PROMPT_TEMPLATE
PAPER_V1 = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)
# ymcui/Chinese-LLaMA-Alpaca-2, scripts/training/build_dataset.py, PROMPT_TEMPLATE
PAPER_V2 = (
    "[INST] <<SYS>>\n"
    "You are a helpful assistant. 你是一个乐于助人的助手。\n"
    "<</SYS>>\n\n{instruction} [/INST]"
)
# ymcui/Chinese-LLaMA-Alpaca-2, scripts/inference/inference_hf.py, DEFAULT_SYSTEM_PROMPT and TEMPLATE
PAPER_V2_SYSTEM = """You are a helpful assistant. 你是一个乐于助人的助手。"""
PAPER_V2_TEMPLATE = "[INST] <<SYS>>\n" "{system_prompt}\n" "<</SYS>>\n\n" "{instruction} [/INST]"
# ymcui/Chinese-LLaMA-Alpaca-2, scripts/inference/gradio_demo.py, TEMPLATE_WITHOUT_SYSTEM_PROMPT
PAPER_V2_NO_SYSTEM = "[INST] {instruction} [/INST]"


def paper_source(template: str, instruction: str, input: str = "") -> str:
    """build_dataset.py's source text: instruction + '\\n' + input when input is not empty."""
    if input is not None and input != "":
        instruction = instruction + "\n" + input
    return template.format_map({"instruction": instruction})


def texts(segments, kind):
    return [s.text for s in segments if s.kind == kind and s.special is None]


@pytest.mark.parametrize("name,paper", [("alpaca", PAPER_V1), ("llama2", PAPER_V2)])
@pytest.mark.parametrize("instruction,input", [("把下面的句子翻译成英文。", "今天天气很好。"), ("一年有多少个月？", ""),
                                               ("Write {a} brace}", "")])
def test_single_turn_is_the_papers_text(name, paper, instruction, input):
    t = T.builtin(name)
    output = "今天\n天气很好。"
    segs = t.segments(single_turn(instruction, output, input))
    source = paper_source(paper, instruction, input)
    # BOS, the paper's source (prompt), the response after the dummy-prefix space, EOS (target).
    assert segs == [T.Segment("prompt", "", "bos"), T.Segment("prompt", source),
                    T.Segment("target", " " + output), T.Segment("target", "", "eos")]
    assert t.render_text(single_turn(instruction, output, input)) == "<s>" + source + " " + output + "</s>"


def test_llama2_system_prompt_follows_the_papers_inference_template():
    t = T.builtin("llama2")
    assert T.LLAMA2_DEFAULT_SYSTEM == PAPER_V2_SYSTEM
    conv = single_turn("你好", "你好！", system="你是一个翻译助手。")
    assert texts(t.segments(conv), "prompt") == [PAPER_V2_TEMPLATE.format_map(
        {"system_prompt": "你是一个翻译助手。", "instruction": "你好"})]
    # An empty system message drops the block: the paper's TEMPLATE_WITHOUT_SYSTEM_PROMPT.
    conv = Conversation((("你好", "你好！"),), system="")
    assert texts(t.segments(conv), "prompt") == [PAPER_V2_NO_SYSTEM.format_map({"instruction": "你好"})]


def test_alpaca_system_replaces_the_header():
    t = T.builtin("alpaca")
    conv = single_turn("你好", "你好！", system="你是一个助手。")
    assert texts(t.segments(conv), "prompt") == ["你是一个助手。\n\n### Instruction:\n你好\n\n### Response: "]
    conv = Conversation((("你好", "你好！"),), system="")
    assert texts(t.segments(conv), "prompt") == ["### Instruction:\n你好\n\n### Response: "]


def test_multi_turn_llama2_follows_the_llama2_chat_convention():
    t = T.builtin("llama2")
    conv = Conversation((("u1", "a1"), ("u2", "a2"), ("u3", "a3")))
    expected = ("<s>" + PAPER_V2.format_map({"instruction": "u1"}) + " a1</s>"
                "<s>[INST] u2 [/INST] a2</s><s>[INST] u3 [/INST] a3</s>")
    assert t.render_text(conv) == expected
    segs = t.segments(conv)
    assert [s.special for s in segs if s.special] == ["bos", "eos"] * 3
    assert texts(segs, "target") == [" a1", " a2", " a3"]
    # BOS opens each turn's prompt; EOS closes each answer and is target (the model must learn to stop).
    assert [(s.special, s.kind) for s in segs if s.special] == [("bos", "prompt"), ("eos", "target")] * 3


def test_multi_turn_alpaca():
    t = T.builtin("alpaca")
    conv = Conversation((("u1", "a1"), ("u2", "a2")))
    assert t.render_text(conv) == ("<s>" + PAPER_V1.format_map({"instruction": "u1"}) + " a1</s>"
                                   "### Instruction:\nu2\n\n### Response:  a2</s>")


def test_generation_prompt_is_the_training_prefix():
    for name in T.BUILTIN:
        t = T.builtin(name)
        conv = Conversation((("u1", "a1"), ("u2", "a2")))
        full = t.segments(conv)
        prompt = t.segments(conv.messages()[:-1])
        assert full[: len(prompt)] == prompt
        assert prompt[-1].kind == "prompt" and texts(prompt, "target") == [" a1"]


def test_special_tokens_are_never_text():
    # A response that spells "</s>" keeps it as text; only the template's eos_token is a special segment.
    segs = T.builtin("llama2").segments(single_turn("say </s>", "a </s> b <s>"))
    assert [s.special for s in segs if s.special] == ["bos", "eos"]
    assert texts(segs, "target") == [" a </s> b <s>"]
    with pytest.raises(UserError, match="private-use"):
        T.builtin("llama2").segments(single_turn("x\ue000", "y"))


def test_role_order_is_checked():
    t = T.builtin("llama2")
    bad = [
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "u"}, {"role": "user", "content": "u"}],
        [{"role": "system", "content": "s"}],
        [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}],
    ]
    for messages in bad:
        with pytest.raises(UserError):
            t.segments(messages)
    # The Jinja text checks the order itself too, for apply_chat_template at inference.
    with pytest.raises(UserError, match="alternate"):
        t.render_text([{"role": "assistant", "content": "a"}])


def test_sha256_is_of_the_text_and_stable():
    import hashlib

    t = T.builtin("alpaca")
    assert t.sha256 == hashlib.sha256(T.ALPACA_JINJA.encode()).hexdigest()
    assert T.builtin("alpaca").sha256 == t.sha256 != T.builtin("llama2").sha256
    assert t.chat_template == T.ALPACA_JINJA
    assert t.describe() == {"name": "alpaca", "sha256": t.sha256, "origin": "builtin"}


CHATML = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def test_jinja_template_from_file_and_tokenizer(tmp_path):
    f = tmp_path / "chatml.jinja"
    f.write_text(CHATML, encoding="utf-8")
    t = T.from_file(f)
    assert (t.name, t.origin) == ("chatml", str(f))
    conv = Conversation((("hi", "hello"), ("bye", "see you")), system="be brief")
    segs = t.segments(conv)
    # {% generation %} marks what carries loss (transformers' convention): content and EOS, not the "\n".
    assert texts(segs, "prompt") == ["<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n", "\n",
                                     "<|user|>\nbye\n<|assistant|>\n", "\n"]
    assert [s.text or s.special for s in segs if s.kind == "target"] == ["hello", "eos", "see you", "eos"]
    assert t.render_text(conv) == ("<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello</s>\n"
                                   "<|user|>\nbye\n<|assistant|>\nsee you</s>\n")
    # Without the tags, all that an assistant message adds to the rendering is target.
    plain = T.from_jinja(CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    assert [s.text or s.special for s in plain.segments(conv) if s.kind == "target"] == [
        "hello", "eos", "\n", "see you", "eos", "\n"]
    # The tokenizer's own template, from tokenizer_config.json or chat_template.jinja.
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert T.from_tokenizer(d).source == CHATML
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": CHATML}]}))
    assert T.from_tokenizer(d).source == CHATML
    assert T.resolve("tokenizer", d).source == CHATML
    (d / "chat_template.jinja").write_text(T.LLAMA2_JINJA)
    assert T.from_tokenizer(d).source == T.LLAMA2_JINJA
    # install_chat_template writes the text that from_tokenizer reads back.
    e = tmp_path / "tok2"
    e.mkdir()
    (e / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    T.install_chat_template(e, T.builtin("alpaca"))
    assert T.from_tokenizer(e).sha256 == T.builtin("alpaca").sha256
    assert json.loads((e / "tokenizer_config.json").read_text())["bos_token"] == "<s>"


def test_template_errors(tmp_path):
    with pytest.raises(UserError, match="unknown template"):
        T.resolve("vicuna")
    with pytest.raises(UserError, match="not found"):
        T.from_file(tmp_path / "missing.jinja")
    with pytest.raises(UserError, match="does not compile"):
        T.from_jinja("{% for m in messages %}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match="no chat_template"):
        T.from_tokenizer(tmp_path)
    # A template whose rendering of earlier messages changes when a later one is added.
    unstable = T.from_jinja("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UserError, match="prefix-stable"):
        unstable.segments(single_turn("u", "a"))
