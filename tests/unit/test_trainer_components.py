"""The trainer's components on their own, single process: metrics, validation, checkpoint state, param groups."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from cllama_dist.errors import UserError
from cllama_dist.trainer.checkpoint import Checkpointer, TrainerState
from cllama_dist.trainer.metrics import Logger, Throughput, read_metrics, train_line
from cllama_dist.trainer.state import RunIdentity


def test_logger_keeps_history_up_to_the_resumed_step_and_reader_tolerates_a_torn_line(tmp_path):
    log = Logger(tmp_path, tensorboard=False, resume_step=-1)
    for step in (1, 2, 3):
        log.log({"type": "train", "step": step, "loss": 1.0 / step})
    log.log({"type": "eval", "step": 3, "loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == [1, 2, 3]
    Logger(tmp_path, tensorboard=False, resume_step=2)  # resuming at 2: step 3 will be trained again
    assert [(r["type"], r["step"]) for r in read_metrics(tmp_path)] == [("train", 1), ("train", 2)]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')  # a line still being written, or torn by a kill
    assert len(read_metrics(tmp_path)) == 2
    Logger(tmp_path, tensorboard=False, resume_step=2)  # resuming after the kill: the torn line goes
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    assert all("time" in r for r in read_metrics(tmp_path))  # every record says when


def test_throughput_window_and_mfu(monkeypatch):
    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr("cllama_dist.trainer.metrics.time.perf_counter", lambda: next(clock))
    t = Throughput(tokens_per_step=1000, world=2, device="cpu", flops_per_token={"actual": 6.0, "conventional": 8.0},
                   peak_flops=1200.0)
    for _ in range(4):
        t.step()
    r = t.report()  # 4 steps x 1000 tokens in 10 s over 2 devices
    assert r["tokens_per_s"] == 400 and r["tokens_per_s_per_device"] == 200 and r["step_time_s"] == 2.5
    assert r["mfu"] == pytest.approx(200 * 6 / 1200) and r["mfu_conventional"] == pytest.approx(200 * 8 / 1200)
    assert t.steps == 0  # a report starts a new window
    line = train_line({"step": 4, "loss": 2.0, "lr": 1e-4, "grad_norm": 0.5, **r})
    assert "400 tok/s (200/device)" in line and "MFU 100.0% (conventional 133.3%)" in line


class _Blocks:
    """Pre-training data as the trainer sees it (trainer/batches.PretrainData's interface)."""

    kind = "pretrain"

    def __init__(self, rows: np.ndarray):
        self.data = rows

    def __len__(self):
        return len(self.data)

    def rows(self, idx):
        return {"input_ids": self.data[np.asarray(idx)]}


class _Model(torch.nn.Module):
    """Logits that depend on the token: a lookup table, so the expected loss is easy to compute."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_validator_loss_is_the_token_mean_over_the_first_n_sequences():
    from cllama_dist.trainer.validate import Validator

    rows = np.random.default_rng(0).integers(0, 11, size=(7, 9))
    model = _Model(11)
    v = Validator(_Blocks(rows), micro=3, sequences=5)
    result = v.run(model, lambda r: {k: torch.from_numpy(a) for k, a in r.items()})
    x = torch.from_numpy(rows[:5])
    logp = torch.log_softmax(model.table[x[:, :-1]], -1)
    expected = -logp.gather(-1, x[:, 1:, None]).mean().item()
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert Validator(_Blocks(rows[:0]), micro=3).run(model, lambda r: r) is None


def test_trainer_state_round_trip_and_resume_checks(tmp_path):
    state = TrainerState(step=4, world_size=2, global_batch=8, samples_consumed=32, tokenizer_sha256="ab",
                         orig_vocab=10, new_vocab=12, embeddings="new-rows", block_size=64, zero_stage=3,
                         reason="periodic", config={"seed": 0})
    data = json.loads(json.dumps(state.__dict__ | {"unknown_later_field": 1}))
    assert TrainerState.from_dict(data) == state
    mine = RunIdentity(global_batch=8, tokenizer={"sha256": "ab", "file_sha256": "cd"}, embeddings="new-rows",
                       block_size=64, zero_stage=3, base_model={}, mixture=[], document_mask=False, shards=[],
                       schedule={})
    Checkpointer.check_resumable(tmp_path, data, mine)
    # A checkpoint of an earlier version recorded the tokenizer file's sha256: still recognised.
    Checkpointer.check_resumable(tmp_path, {**data, "tokenizer_sha256": "cd"}, mine)
    with pytest.raises(UserError, match="trained with the tokenizer ef"):
        Checkpointer.check_resumable(tmp_path, {**data, "tokenizer_sha256": "ef"}, mine)
    with pytest.raises(UserError, match="trained on the base /a .* this run's base is /b"):
        Checkpointer.check_resumable(tmp_path, {**data, "base_model": {"source": "/a", "sha256": "1"}},
                                     replace(mine, base_model={"source": "/b", "sha256": "2"}))
    with pytest.raises(UserError, match="its global_batch is 8, this run's is 16"):
        Checkpointer.check_resumable(tmp_path, data, replace(mine, global_batch=16))
    with pytest.raises(UserError, match=r"saved under ZeRO-3 \(engine.frozen_base: partitioned\), this run is ZeRO-2 "
                                         r"\(engine.frozen_base: resident\)"):
        Checkpointer.check_resumable(tmp_path, data, replace(mine, zero_stage=2))
    with pytest.raises(UserError, match=r"saved under ZeRO-1 \(engine.frozen_base: resident\), this run is ZeRO-3"):
        Checkpointer.check_resumable(tmp_path, {**data, "zero_stage": 1}, mine)
    # ZeRO-1 and ZeRO-2 share DeepSpeed's layout: either resumes under the other.
    Checkpointer.check_resumable(tmp_path, {**data, "zero_stage": 1}, replace(mine, zero_stage=2))
    Checkpointer.check_resumable(tmp_path, {**data, "zero_stage": 2}, replace(mine, zero_stage=1))


def test_param_groups_split_lora_from_embedding_rows_by_the_vocab_naming_contract():
    from cllama_dist.model.vocab import BASE_ROWS, NEW_ROWS, SplitLMHead, is_embedding_param
    from cllama_dist.trainer.config import OptimConfig
    from cllama_dist.trainer.engine import param_groups

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = SplitLMHead(torch.zeros(4, 2), torch.zeros(3, 2))
            self.lora_A = torch.nn.Linear(2, 2)
            self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)

    groups = param_groups(M(), OptimConfig(lr=1e-3, embedding_lr=5e-3, weight_decay=0.1))
    assert [(g["name"], g["peak_lr"], g["weight_decay"], len(g["params"])) for g in groups] == \
        [("lora", 1e-3, 0.1, 2), ("embeddings", 5e-3, 0.0, 1)]
    assert is_embedding_param(f"base_model.model.lm_head.{NEW_ROWS}") and is_embedding_param(BASE_ROWS)
    assert not is_embedding_param("model.layers.0.self_attn.q_proj.lora_A.default.weight")
