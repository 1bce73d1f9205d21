"""cllama chat: prompts are encode_prompt's ids, answers the model's greedy tokens, streamed text the final decode."""

import io
import json
import shutil

import pytest
import sentencepiece as spm
import torch

from cllama_dist import cli
from cllama_dist.chat import Session
from cllama_dist.errors import UserError
from cllama_dist.inference.generate import Sampling, StreamDecoder
from cllama_dist.sft import templates
from cllama_dist.sft.encode import encode_prompt, user_turn
from cllama_dist.sft.templates import pick_template

from ..conftest import TINY_LLAMA

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def sp(tiny_merged):
    return spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))


def _model_folder(folder, tiny_merged, sp, template=None, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=sp.get_piece_size(), **TINY_LLAMA)).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_merged / name, folder / name)
    if template is not None:
        templates.install_chat_template(folder, templates.builtin(template))
    return folder


@pytest.fixture(scope="module")
def alpaca_model(tmp_path_factory, tiny_merged, sp):
    """A random tiny LLaMA of the merged vocabulary, with the merged tokenizer and the alpaca template beside it."""
    return _model_folder(tmp_path_factory.mktemp("chat") / "alpaca", tiny_merged, sp, "alpaca")


@pytest.fixture(scope="module")
def loaded(alpaca_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(alpaca_model, dtype=torch.float32).eval()


def greedy(model, ids, eos, n):
    """Reference: argmax of a full forward pass at every step (no cache), stopping at EOS."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if t == eos:
                return out, "eos"
            out.append(t)
    return out, "max_new_tokens"


# ------------------------------------------------------------------------------ streaming decode


def test_stream_decoder_holds_bytes_until_a_character_is_whole(sp):
    text = "😀 中文abc 龘。"
    ids = sp.encode(text)
    assert sum(sp.is_byte(i) for i in ids) >= 7  # 😀 and 龘 fall back to bytes in the tiny tokenizer
    dec = StreamDecoder(sp)
    shown = ""
    for k, t in enumerate(ids, 1):
        piece = dec.push(t)
        assert "\ufffd" not in piece and "<0x" not in piece
        shown += piece
        # Everything but a trailing incomplete character is out as soon as its last token arrived.
        assert shown == sp.decode(ids[:k]).rstrip("\ufffd")
    shown += dec.finish()
    assert shown == sp.decode(ids) == text
    # A character cut by the end of generation comes out as SentencePiece decodes it; invalid bytes too.
    for cut in (ids[:-1], [sp.piece_to_id("<0x80>"), sp.piece_to_id("a")], [sp.piece_to_id("<0xE4>")] * 3):
        dec = StreamDecoder(sp)
        streamed = "".join(dec.push(t) for t in cut) + dec.finish()
        assert streamed == sp.decode(cut)


# ------------------------------------------------------------------------------ the command, end to end


def _chat(args, capsys):
    code = cli.main(["chat", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_scripted_chat_end_to_end(alpaca_model, loaded, sp, tmp_path, capsys):
    t = templates.builtin("alpaca")
    messages = ["你好", "把这句话倒过来：我爱北京。", "/reset", "hi 😀"]
    out_json = tmp_path / "t.json"
    args = ["--model", alpaca_model, "--temperature", 0, "--max-new-tokens", 12, "--json-out", out_json]
    for m in messages:
        args += ["--message", m]
    code, out, err = _chat(args, capsys)
    assert code == 0, err
    tr = json.loads(out_json.read_text())
    assert tr["template"]["name"] == "alpaca" and tr["template"]["sha256"] == t.sha256
    convs = tr["conversations"]
    assert [[x["user"] for x in c] for c in convs] == [messages[:2], messages[3:]]  # /reset started a new one
    (a, b), (c,) = convs
    # Prompts: exactly encode_prompt's ids of the conversation so far (the history holds the decoded answer).
    assert a["prompt_ids"] == encode_prompt(user_turn("你好"), t, sp)
    assert b["prompt_ids"] == encode_prompt(user_turn(messages[1], [("你好", a["assistant"])]), t, sp)
    assert c["prompt_ids"] == encode_prompt(user_turn("hi 😀"), t, sp)
    # Answers: the model's greedy tokens, decoded with SentencePiece; what was streamed is that text.
    for turn in (a, b, c):
        ids, stop = greedy(loaded, turn["prompt_ids"], sp.eos_id(), 12)
        assert turn["answer_ids"] == ids and turn["stop"] == stop
        assert turn["assistant"] == sp.decode(ids)
    assert out == "".join(x["assistant"] + "\n" for x in (a, b, c))
    assert "<0x" not in out
    assert "(history cleared)" in err and "template alpaca" in err
    # Deterministic with temperature 0.
    code, again, _ = _chat(args, capsys)
    timeless = lambda cs: [[{k: v for k, v in x.items() if k != "seconds"} for x in c] for c in cs]  # noqa: E731
    assert code == 0 and again == out
    assert timeless(json.loads(out_json.read_text())["conversations"]) == timeless(convs)


def test_chat_reads_stdin_line_by_line(alpaca_model, sp, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("第一行\\\n第二行\n\n/exit\nnever answered\n"))
    code, out, err = _chat(["--model", alpaca_model, "--temperature", 0, "--max-new-tokens", 3,
                            "--json-out", tmp_path / "t.json"], capsys)
    assert code == 0, err
    (conv,) = json.loads((tmp_path / "t.json").read_text())["conversations"]
    assert [x["user"] for x in conv] == ["第一行\n第二行"]  # a trailing backslash continues the message
    assert conv[0]["prompt_ids"] == encode_prompt(user_turn("第一行\n第二行"), templates.builtin("alpaca"), sp)


def test_refusals_and_notes(alpaca_model, tiny_merged, sp, tmp_path, capsys):
    bare = tmp_path / "bare"  # a tokenizer folder without a template, and no model weights at all
    bare.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_merged / name, bare / name)
    code, _, err = _chat(["--model", bare, "--message", "hi"], capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("cllama chat: error: no chat template:") and "--template alpaca" in line
    assert "Hugging Face" not in err  # refused before the model was loaded
    code, _, err = _chat(["--model", alpaca_model, "--template", "vicuna", "--message", "hi"], capsys)
    assert code == 2 and "unknown template 'vicuna'" in err
    # Another template than the model's own: used, with a note.
    code, _, err = _chat(["--model", alpaca_model, "--template", "llama2", "--temperature", 0, "--max-new-tokens", 2,
                          "--message", "hi"], capsys)
    assert code == 0 and "is not the model's own chat template" in err and "template llama2" in err
    # The model's own template is found beside the model when --tokenizer names a folder without one.
    assert pick_template("", alpaca_model, tokenizer=bare).name == "alpaca"
    with pytest.raises(UserError, match="--template alpaca"):
        pick_template("auto", bare)
    assert pick_template("auto", bare, required=False) is None and pick_template("none", alpaca_model,
                                                                                  required=False) is None


# ------------------------------------------------------------------------------ the session


def test_session_stops_at_eos_and_keeps_multi_turn_llama2_history(loaded, alpaca_model, tmp_path, sp):
    from transformers import AutoTokenizer

    llama2 = templates.builtin("llama2")
    prompt = encode_prompt(user_turn("你好", system="只用中文回答。"), llama2, sp)
    model = type(loaded)(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.eval()
    # Make EOS the greedy choice within a few steps: its output row a multiple of the row of the third token.
    first, _ = greedy(model, prompt, sp.eos_id(), 3)
    with torch.no_grad():
        model.lm_head.weight[sp.eos_id()] = 3 * model.lm_head.weight[first[2]]
    s = Session(model, sp, llama2, torch.device("cpu"), Sampling(20), system="只用中文回答。", max_positions=256)
    streamed = []
    one = s.answer("你好", streamed.append)
    want, stop = greedy(model, prompt, sp.eos_id(), 20)
    assert one.stop == stop == "eos" and one.answer_ids == want and len(want) < 20
    assert "".join(streamed) == one.assistant == sp.decode(want)
    two = s.answer("再说一遍")
    history = user_turn("再说一遍", [("你好", one.assistant)], "只用中文回答。")
    assert two.prompt_ids == encode_prompt(history, llama2, sp)
    # Multi-turn llama2: stock transformers formats the same history to the same ids.
    folder = tmp_path / "tok"
    shutil.copytree(alpaca_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    templates.install_chat_template(folder, llama2)
    stock = AutoTokenizer.from_pretrained(folder).apply_chat_template(history, add_generation_prompt=True,
                                                                      tokenize=True, return_dict=False)
    assert list(stock) == two.prompt_ids
    s.reset()
    assert s.history == [] and len(s.conversations) == 2
    assert s.answer("你好").prompt_ids == prompt


def test_session_drops_the_oldest_turns_to_fit_the_context(loaded, sp):
    t = templates.builtin("alpaca")
    alone = len(encode_prompt(user_turn("第二个问题"), t, sp))
    s = Session(loaded, sp, t, torch.device("cpu"), Sampling(4), max_positions=alone + 4)
    notes = []
    s.notes = notes.append
    s.answer("第一个问题")
    two = s.answer("第二个问题")
    assert two.dropped_turns == 1 and len(two.prompt_ids) == alone and notes
    assert two.prompt_ids == encode_prompt(user_turn("第二个问题"), t, sp)
    with pytest.raises(UserError, match="the message is too long"):
        s.answer("很长" * 200)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_interactive_ctrl_c_stops_an_answer_then_ends_the_chat(alpaca_model, sp, tmp_path, capsys, monkeypatch):
    import cllama_dist.chat as chat_module

    typed = iter(["你好", "第二个", "第三个", "/reset", "第四个"])

    def fake_input(prompt=""):
        try:
            return next(typed)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt

    real = chat_module.generate_ids

    def interrupted_second(model, ids, eos, sampling, device, on_token=None):
        if len(calls) == 1:  # the second answer: two tokens out, then Ctrl-C
            calls.append(ids)
            for t in sp.encode("好的")[:2]:
                on_token(t)
            raise KeyboardInterrupt
        calls.append(ids)
        return real(model, ids, eos, sampling, device, on_token)

    calls = []
    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr("sys.stdin", _Terminal())
    monkeypatch.setattr(chat_module, "generate_ids", interrupted_second)
    code, out, err = _chat(["--model", alpaca_model, "--temperature", 0, "--max-new-tokens", 3,
                            "--json-out", tmp_path / "t.json"], capsys)
    assert code == 0, err
    assert "/reset clears the history" in err and "[answer interrupted: left out of the history]" in err
    first, second = json.loads((tmp_path / "t.json").read_text())["conversations"]
    assert [t["stop"] for t in first] == ["max_new_tokens", "interrupted", "max_new_tokens"]
    assert first[1]["assistant"] == sp.decode(sp.encode("好的")[:2]) and first[1]["answer_ids"] == sp.encode("好的")[:2]
    alpaca = templates.builtin("alpaca")
    # The interrupted answer stays out of the history; the chat goes on after it.
    assert first[2]["prompt_ids"] == encode_prompt(user_turn("第三个", [("你好", first[0]["assistant"])]), alpaca, sp)
    assert second[0]["prompt_ids"] == encode_prompt(user_turn("第四个"), alpaca, sp)
    assert out.count("\n") == 4
