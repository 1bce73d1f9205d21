"""Multiple-choice scoring (C-Eval / CMMLU CSV): a tiny synthetic set with a hand-checked result."""

from __future__ import annotations

import json

import pytest
import torch

from cllama_dist.errors import UserError
from cllama_dist.eval.choices import continuation_ids, option_nll, prompt_text, read_questions
from cllama_dist.eval.config import EvalConfig
from cllama_dist.inference.load import Tokenizer

HEADER = "id,question,A,B,C,D,answer\n"


def _csv(path, rows):
    path.write_text(HEADER + "".join(f"{i},{q},{a},{b},{c},{d},{ans}\n" for i, (q, a, b, c, d, ans) in enumerate(rows)),
                    encoding="utf-8")
    return path


@pytest.fixture
def mc(tmp_path):
    d = tmp_path / "val"
    d.mkdir()
    _csv(d / "math_val.csv", [("1+1=?", "1", "2", "3", "4", "B"), ("2+2=?", "2", "3", "4", "5", "C"),
                              ("3-1=?", "0", "2", "4", "6", "B")])
    _csv(d / "physics_val.csv", [("光速最接近？", "3e8 m/s", "3e5 m/s", "340 m/s", "1 m/s", "A"),
                                 ("水的沸点？", "0", "100", "50", "200", "B"), ("没有答案的题", "a", "b", "c", "d", "")])
    dev = tmp_path / "dev"
    dev.mkdir()
    _csv(dev / "math_dev.csv", [("5+5=?", "10", "11", "12", "13", "A")])
    _csv(dev / "physics_dev.csv", [("重力加速度约？", "1", "9.8", "20", "100", "B")])
    return d, dev


class FavoursOneToken(torch.nn.Module):
    """Every position predicts token ``t`` with logit 10 (others 0): the option spelled by ``t`` always wins."""

    def __init__(self, vocab: int, t: int):
        super().__init__()
        self.vocab, self.t = vocab, t
        self.config = type("C", (), {"max_position_embeddings": 512})()

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.t] = 10.0
        return type("Out", (), {"logits": logits})()


def test_accuracy_per_subject_and_overall_by_hand(mc, tiny_base, tmp_path):
    from cllama_dist.eval.choices import evaluate_choices

    tok = Tokenizer(tiny_base)
    val, dev = mc
    prompt = prompt_text(read_questions(val / "math_val.csv", {})[0], [], 0)
    (b_token,) = continuation_ids(tok, prompt, "B", tok.encode([prompt])[0])[-1:]
    model = FavoursOneToken(tok.size, b_token)
    cfg = EvalConfig(model="m", choices=[str(val)], choices_dev=[str(dev)], shots=1, inputs=[], tokenizer=str(tiny_base))
    r = evaluate_choices(cfg, model, tok, torch.device("cpu"))
    # The model always answers B: math 2 of 3 (B, C, B), physics 1 of 2 (A, B); the row without an answer skipped.
    assert r["subjects"] == {"math": {"questions": 3, "correct": 2, "accuracy": 2 / 3},
                             "physics": {"questions": 2, "correct": 1, "accuracy": 0.5}}
    assert (r["correct"], r["questions"], r["skipped"]) == (3, 5, {"no_answer": 1})
    assert r["accuracy"] == 0.6 and r["macro_accuracy"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert all(a["picked"] == "B" for a in r["answers"])


def test_the_prompt_is_c_evals_form_with_the_shots():
    from cllama_dist.eval.choices import Question

    q = Question("high_school_math", "1+1=?", ("1", "2", "3", "4"), "B", "x")
    d = Question("high_school_math", "5+5=?", ("10", "11", "12", "13"), "A", "y")
    assert prompt_text(q, [d], 1) == ("以下是中国关于high school math考试的单项选择题，请选出其中的正确答案。\n\n"
                                      "5+5=?\nA. 10\nB. 11\nC. 12\nD. 13\n答案：A\n\n"
                                      "1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    assert prompt_text(q, [d], 0).endswith("\n\n1+1=?\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")


def test_option_scores_equal_a_direct_log_likelihood(tiny_base):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cllama_dist.model.presets import TINY

    tok = Tokenizer(tiny_base)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.size, **TINY)).eval()
    prompt = "以下是题目。\n答案："
    got = option_nll(model, tok, prompt, ["A", "甲乙"], torch.device("cpu"), 256)
    p = [tok.bos_id] + tok.encode([prompt])[0]
    for cont, nll in zip(["A", "甲乙"], got):
        c = continuation_ids(tok, prompt, cont, p[1:])
        x = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
        direct = -sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
        assert nll == pytest.approx(direct, rel=1e-5)
    # cllama eval gives the model the chunked loss forward (inference/load.py): the same scores through it.
    from cllama_dist.model.adapters import install_loss_forward

    install_loss_forward(model, "chunked", "torch")
    assert option_nll(model, tok, prompt, ["A", "甲乙"], torch.device("cpu"), 256) == pytest.approx(got, rel=1e-6)


def test_bad_files_are_refused_in_one_line(tmp_path, mc):
    bad = tmp_path / "x_val.csv"
    bad.write_text("question,A,B,C\nq,1,2,3\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"x_val.csv:1: no column d, answer in the header"):
        read_questions(bad, {})
    with pytest.raises(UserError, match="few-shot examples need choices_dev"):
        EvalConfig(model="m", choices=[str(mc[0])], shots=5)


def test_through_the_cli_with_a_real_tiny_model(mc, tiny_base, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cllama_dist.cli import main
    from cllama_dist.model.presets import TINY

    LlamaForCausalLM(LlamaConfig(vocab_size=Tokenizer(tiny_base).size, **TINY)).save_pretrained(tmp_path / "m")
    out = tmp_path / "mc.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--tokenizer", str(tiny_base), "--choices", str(mc[0]),
                 "--choices-dev", str(mc[1]), "--shots", "1", "--choices-score", "text", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())["choices"]
    assert r["questions"] == 5 and set(r["subjects"]) == {"math", "physics"} and r["score"] == "text"
