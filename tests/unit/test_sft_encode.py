"""Encoding: the paper's token stream, masks token by token, and what stock apply_chat_template gives.

Runs on the tiny merged tokenizer (conftest's tiny_merged), and with CLLAMA_FIXTURES also on the
paper's own merge (LLaMA's tokenizer.model + chinese_sp.model, built here with our merge).
"""

import re
import subprocess
import sys

import pytest
import sentencepiece as spm

from cllama_dist.errors import UserError
from cllama_dist.sft import templates as T
from cllama_dist.sft.encode import (Encoded, Skip, encode_all, encode_conversation, encode_prompt, labels,
                                    stock_ids, EncodeStats)
from cllama_dist.sft.records import Conversation, single_turn

# The paper's templates, literal data from its code (see test_sft_templates.py for the sources):
# ymcui/Chinese-LLaMA-Alpaca scripts/training/build_dataset.py and ymcui/Chinese-LLaMA-Alpaca-2 same path.
PAPER_V1 = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
PAPER_V2 = ("[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
            "{instruction} [/INST]")
PAPER = {"alpaca": PAPER_V1, "llama2": PAPER_V2}

RECORDS = [  # (instruction, input, output): Chinese, English, digits, punctuation first, leading space
    ("把下面的句子翻译成英文。", "今天天气很好。", "The weather is nice today."),
    ("一年有多少个月？", "", "一年有十二个月。"),
    ("计算：12+30", "", "42"),
    ("续写", "", "。然后他走了。"),
    ("Repeat with a space first", "", " two  spaces\tand a tab "),
    ("写一句话", "", "春天来了，小草从土里探出头。\n柳树也发了新芽。"),
]


@pytest.fixture(scope="module", params=["tiny", "real"])
def tok(request, tmp_path_factory):
    """A merged tokenizer folder: the tiny CPU one, or the paper's (LLaMA + chinese_sp) with fixtures."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny_merged")
    real = request.getfixturevalue("real_fixtures")
    from cllama_dist.tokenizer.config import MergeConfig
    from cllama_dist.tokenizer.merge import merge

    out = tmp_path_factory.mktemp("real_merged") / "tok"
    merge(MergeConfig(base=str(real / "llama_tokenizer.model"), add=str(real / "chinese_sp.model"), out=str(out)))
    return out


@pytest.fixture(scope="module")
def sp(tok):
    return spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))


def paper_encode(sp, template, instruction, input, output):
    """build_dataset.py's stream: tokenizer(source) (BOS added) + tokenizer(output + eos, no specials)."""
    if input is not None and input != "":
        instruction = instruction + "\n" + input
    s = [sp.bos_id()] + sp.encode(template.format_map({"instruction": instruction}))
    t = sp.encode(output) + [sp.eos_id()]
    return s + t, [0] * len(s) + [1] * len(t)


@pytest.mark.parametrize("name", ["alpaca", "llama2"])
def test_token_stream_is_the_papers(sp, name):
    t = T.builtin(name)
    for instruction, input, output in RECORDS:
        ids, mask = paper_encode(sp, PAPER[name], instruction, input, output)
        got = encode_conversation(single_turn(instruction, output, input), t, sp, 512)
        assert isinstance(got, Encoded) and not got.truncated
        assert got.input_ids == ids, (instruction, [sp.id_to_piece(i) for i in got.input_ids])
        assert got.loss_mask == mask
        assert labels(got.input_ids, got.loss_mask) == [i if m else -100 for i, m in zip(ids, mask)]


def test_paper_stream_golden(sp, tok, request):
    """The exact pieces, fixed by hand for the paper's merged tokenizer (v1's trailing-space token)."""
    if "real" not in request.node.callspec.id:
        pytest.skip("golden pieces are for the paper's tokenizer")
    got = encode_conversation(single_turn("你好", "今天天气很好。"), T.builtin("alpaca"), sp, 512)
    pieces = [sp.id_to_piece(i) for i in got.input_ids]
    assert pieces[-12:] == ["<0x0A>", "<0x0A>", "##", "#", "▁Response", ":", "▁", "▁今天", "天气", "很好", "。", "</s>"]
    assert got.loss_mask[-5:] == [1] * 5 and got.loss_mask[-6] == 0
    got = encode_conversation(single_turn("你好", "今天天气很好。"), T.builtin("llama2"), sp, 512)
    assert [sp.id_to_piece(i) for i in got.input_ids][-8:] == ["/", "INST", "]", "▁今天", "天气", "很好", "。", "</s>"]


@pytest.mark.parametrize("name", ["alpaca", "llama2"])
def test_multi_turn_mask_token_by_token(sp, name):
    system = "你是一个认真的助手。"
    turns = [("把这个词语倒过来写：苹果", "果苹"), ("再把它重复三遍。", "果苹、果苹、果苹"), ("谢谢", "不客气！")]
    conv = Conversation(tuple(turns), system)
    # Reference built straight from the paper's strings with SentencePiece (not through the templates).
    ids, mask = [], []

    def put(x, m):
        ids.extend(x)
        mask.extend([m] * len(x))

    for k, (u, a) in enumerate(turns):
        if name == "llama2":
            prompt = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{u} [/INST]" if k == 0 else f"[INST] {u} [/INST]"
            put([sp.bos_id()], 0)
        else:
            prompt = (system + "\n\n" if k == 0 else "") + f"### Instruction:\n{u}\n\n### Response: "
            if k == 0:
                put([sp.bos_id()], 0)
        put(sp.encode(prompt), 0)
        put(sp.encode(a) + [sp.eos_id()], 1)
    got = encode_conversation(conv, T.builtin(name), sp, 512)
    for i, (g, e, gm, em) in enumerate(zip(got.input_ids, ids, got.loss_mask, mask)):
        assert (g, gm) == (e, em), f"token {i}: {sp.id_to_piece(g)}/{gm} != {sp.id_to_piece(e)}/{em}"
    assert len(got.input_ids) == len(ids)
    # Mask 1 exactly on the answers and their EOS.
    answer_ids = [i for (_, a) in turns for i in sp.encode(a) + [sp.eos_id()]]
    assert [i for i, m in zip(got.input_ids, got.loss_mask) if m] == answer_ids


def test_special_tokens_only_by_id(sp):
    # Text that spells the special tokens is tokenized as text: exactly one BOS and one EOS.
    conv = single_turn("写 <s> 和 </s>", "好的：</s> 和 <s>")
    for name in ("alpaca", "llama2"):
        got = encode_conversation(conv, T.builtin(name), sp, 512)
        assert got.input_ids.count(sp.eos_id()) == 1 and got.input_ids[-1] == sp.eos_id()
        assert got.input_ids.count(sp.bos_id()) == 1 and got.input_ids[0] == sp.bos_id()
    literal = T.from_jinja("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}", origin="bad.jinja")
    with pytest.raises(UserError, match="bos_token"):
        encode_conversation(conv, literal, sp, 512)


def test_truncate_or_skip(sp):
    t = T.builtin("llama2")
    conv = single_turn("写一句话", "春天来了，小草从土里探出头，柳树也发了新芽。" * 3)
    full = encode_conversation(conv, t, sp, 10_000)
    n = len(full.input_ids)
    n_prompt = full.loss_mask.index(1)
    cut = encode_conversation(conv, t, sp, n - 5)
    assert cut.truncated and cut.input_ids == full.input_ids[: n - 5] and cut.loss_mask == full.loss_mask[: n - 5]
    assert encode_conversation(conv, t, sp, n - 5, overflow="skip") == Skip("too_long", n)
    assert encode_conversation(conv, t, sp, n) == full
    # Nothing of the response left: skipped under either policy (a loss over zero tokens).
    assert encode_conversation(conv, t, sp, n_prompt) == Skip("prompt_too_long", n)
    assert encode_conversation(conv, t, sp, n_prompt + 1).loss_mask[-1] == 1
    stats = EncodeStats()
    out = list(encode_all([conv, conv], t, sp, n - 5, stats=stats))
    assert len(out) == 2 and stats.as_dict()["truncated"] == 2
    stats = EncodeStats()
    assert list(encode_all([conv], t, sp, n - 5, overflow="skip", stats=stats)) == []
    assert stats.as_dict()["skipped"] == {"too_long": 1, "prompt_too_long": 0}
    with pytest.raises(UserError, match="end with an assistant"):
        encode_conversation([{"role": "user", "content": "u"}], t, sp, 100)


def test_normalizer_that_strips_spaces_is_refused(tiny_zh_model):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_zh_model))  # SentencePiece's defaults: strips whitespace
    with pytest.raises(UserError, match="remove_extra_whitespaces"):
        encode_conversation(single_turn("你好", "你好"), T.builtin("alpaca"), sp, 100)


def test_no_piece_holds_a_space_after_text(sp):
    """What makes a space-led response's boundary clean in stock tokenization (encode.py's argument)."""
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert not [p for p in pieces if re.search("[^▁]▁", p)]


def _hf_folder(tmp_path, tok, template):
    """A tokenizer folder written by hf.write_folder, with the template as its chat_template."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from cllama_dist.tokenizer.hf import write_folder

    data = (tok / "tokenizer.model").read_bytes()
    proto = pb.ModelProto()
    proto.ParseFromString(data)
    out = tmp_path / template.name
    write_folder(out, data, proto)
    T.install_chat_template(out, template)
    return out


def blank_first(sp, a):
    """Whether the answer's own encoding starts with a whitespace-only piece ("▁", "▁▁", ...)."""
    return set(sp.id_to_piece(sp.encode(a)[0])) == {"▁"}


def _answers(sp):
    # Answers whose own encoding starts with a bare "▁" (punctuation or a leading space) and ones that do not.
    return ["你好！有什么可以帮你？", "。好的", " 两个空格", "Hello there.", "42", "果苹、果苹"]


@pytest.mark.parametrize("name", ["alpaca", "llama2"])
def test_apply_chat_template_reproduces_training_prompt(sp, tok, tmp_path, name):
    from transformers import AutoTokenizer

    t = T.builtin(name)
    hf = AutoTokenizer.from_pretrained(str(_hf_folder(tmp_path, tok, t)))
    has_double = sp.id_to_piece(sp.piece_to_id("▁▁")) == "▁▁"  # LLaMA's vocabulary has it; the tiny one not

    def stock(messages):
        out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"])

    # Single turn, with and without a system message: always identical.
    for instruction, input, output in RECORDS:
        conv = single_turn(instruction, output, input)
        msgs = conv.messages()[:-1]
        assert stock(msgs) == encode_prompt(msgs, t, sp)
        assert hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == t.render_text(msgs)
        # ... and the prompt is exactly the prefix of the training example before its first target token.
        train = encode_conversation(conv, t, sp, 512)
        assert train.input_ids[: train.loss_mask.index(1)] == encode_prompt(msgs, t, sp)
        sys_msgs = [{"role": "system", "content": "你是一个助手。"}] + msgs
        assert stock(sys_msgs) == encode_prompt(sys_msgs, t, sp)
    # Multi-turn: llama2 always; alpaca whenever no history answer's encoding starts with a whitespace-only
    # piece (v1's "Response: " already ends with "▁", and in any string it merges with a following
    # "▁" / "▁▁" into "▁▁" / "▁▁▁" where the vocabulary has those pieces, as LLaMA's does).
    for a in _answers(sp):
        msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": a},
                {"role": "user", "content": "再说一遍"}]
        ours = encode_prompt(msgs, t, sp)
        conv = Conversation((("你好", a), ("再说一遍", "好")))
        train = encode_conversation(conv, t, sp, 512)
        last_target = len(train.loss_mask) - train.loss_mask[::-1].index(0)
        assert train.input_ids[:last_target] == ours  # training prefix of turn 2 == the inference prompt
        if name == "llama2" or not blank_first(sp, a):
            assert stock(msgs) == ours, (name, a)
        elif has_double and not a[0].isspace():
            assert stock(msgs) != ours, (name, a)  # [..., ":", "▁", "▁", ...] became [..., ":", "▁▁", ...]
        assert stock(msgs) == stock_ids(msgs, t, sp)  # stock_ids models transformers exactly


def test_stock_equals_training_over_real_sentences(sp, zh_docs):
    """Over many conversations: llama2's stock tokenization always equals training's; alpaca's whenever
    no answer's encoding starts with a whitespace-only piece (and, with LLaMA's "▁▁", only then)."""
    sentences = [s for d in zh_docs[:40] for s in re.split("(?<=[。！？])", d) if 2 < len(s) < 80][:300]
    has_double = sp.id_to_piece(sp.piece_to_id("▁▁")) == "▁▁"
    differ = {"alpaca": 0, "llama2": 0}
    for k in range(0, len(sentences) - 3, 3):
        u1, a1, a2 = sentences[k: k + 3]
        conv = Conversation(((u1, a1), ("继续。", a2)))
        for name in ("alpaca", "llama2"):
            t = T.builtin(name)
            ours = encode_conversation(conv, t, sp, 10_000).input_ids
            same = stock_ids(conv, t, sp) == ours
            if name == "llama2" or not (blank_first(sp, a1) or blank_first(sp, a2)):
                assert same, (name, a1, a2)
            elif has_double:
                assert not same, (name, a1, a2)
            differ[name] += not same
    assert differ["llama2"] == 0


def test_sft_package_imports_no_torch():
    code = ("import sys\nimport cllama_dist.sft.records, cllama_dist.sft.templates, cllama_dist.sft.encode, "
            "cllama_dist.sft.pack, cllama_dist.sft.shipped\n"
            "bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]\nassert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_custom_jinja_template_matches_stock(sp, tok, tmp_path):
    """A template in transformers' conventions (generation blocks, no space before the answer): the
    training prompt of every turn is what apply_chat_template gives, and the history too."""
    from transformers import AutoTokenizer

    source = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}"
              "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
              "{% else %}{{ m['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
    t = T.from_jinja(source, name="chatml")
    hf = AutoTokenizer.from_pretrained(str(_hf_folder(tmp_path, tok, t)))
    msgs = [{"role": "system", "content": "简洁"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！有什么可以帮你？"}, {"role": "user", "content": "1+1等于几？"}]
    for k in (2, 4):
        stock = list(hf.apply_chat_template(msgs[:k], add_generation_prompt=True, tokenize=True)["input_ids"])
        assert stock == encode_prompt(msgs[:k], t, sp)
    conv = Conversation((("你好", "你好！有什么可以帮你？"), ("1+1等于几？", "2")), "简洁")
    got = encode_conversation(conv, t, sp, 512)
    assert got.input_ids == stock_ids(conv, t, sp)
    # Loss on the answers and their EOS only, not on the "\n" the template writes after them.
    assert [i for i, m in zip(got.input_ids, got.loss_mask) if m] == (
        _cont(sp, "你好！有什么可以帮你？") + [sp.eos_id()]
        + _cont(sp, "2") + [sp.eos_id()])


def _cont(sp, text):
    """Text continuing a chunk: SentencePiece with its dummy prefix off."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    m.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString()).encode(text)
