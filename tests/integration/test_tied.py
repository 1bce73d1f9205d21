"""A tied model (lm_head = embed_tokens) with padding rows, trained by 2 processes under ZeRO-3 (partitioned, the
CPU default): one block of new rows serves both ends and stays one Parameter, the old rows stay bit-identical,
a resume continues the loss and keeps the tie; a resume on an untied model is refused in one line
(docs/hazards.md#b6, #b7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cllama_dist.model.presets import TINY

from . import launch
from .runs import configure

pytestmark = pytest.mark.integration

ROWS = 1024  # the fixture's base tokenizer has 1,000 tokens: 24 padding rows, reused first by the new tokens
TIED = {"model.path": "", "model.config": {**TINY, "vocab_size": ROWS, "tie_word_embeddings": True},
        "validation.every": 0}
PROBE = Path(__file__).with_name("probe_train.py")


def probe(cfg: Path, dump: Path) -> dict:
    proc = launch.run(cfg, script=PROBE, extra=[str(dump)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(dump, weights_only=False)


def test_tied_padded_model_trains_resumes_and_refuses_an_untied_resume(setup, tmp_path):
    _, tok, _, _ = setup
    report = json.loads((tok / "merge_report.json").read_text())
    base_tokens, tokens = report["base"]["vocab_size"], report.get("new_vocab_size") or None
    cfg, out = configure(setup, "tied", **{**TIED, "optim.max_steps": 6, "checkpoint.save_every": 3})
    d = probe(cfg, tmp_path / "tied.pt")
    emb = "base_model.model.model.embed_tokens."
    before, after = d["before"], d["after"]
    assert d["tied"] == [True, True]
    # One block of new rows under one name: the head has no parameters of its own.
    assert not any(n.startswith("base_model.model.lm_head.") for n in before)
    assert {n for n in d["trainable"] if "lora_" not in n} == {emb + "weight_new"}
    assert before[emb + "weight_base"].shape[0] == base_tokens
    assert torch.equal(before[emb + "weight_base"], after[emb + "weight_base"])  # old rows bit-identical
    assert not torch.equal(before[emb + "weight_new"], after[emb + "weight_new"])
    counts = d["counts"]
    assert counts["trainable"] == counts["lora"] + counts["new_rows"]
    assert counts["trainable"] <= d["optimizer_numel"] < counts["trainable"] + 4096  # new rows once

    state = json.loads((out / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["tied"] is True
    rows = state["rows"]
    assert (rows["base_rows"], rows["base_tokens"], rows["padded_rows"]) == (ROWS, base_tokens, "reuse")
    assert rows["tokens"] == state["new_vocab"] and rows["rows"] == max(ROWS, state["new_vocab"])
    assert tokens is None or tokens == state["new_vocab"]

    # Resume from step 3 in a fresh folder: the same loss curve after it, and the tie holds in the resumed model.
    cfg2, out2 = configure(setup, "tied_resumed", **{**TIED, "optim.max_steps": 6, "checkpoint.save_every": 3})
    shutil.copytree(out / "checkpoints" / "step-00000003", out2 / "checkpoints" / "step-00000003")
    d2 = probe(cfg2, tmp_path / "resumed.pt")
    assert d2["tied"] == [True, True] and d2["state"] == 3
    assert torch.equal(d2["after"][emb + "weight_base"], before[emb + "weight_base"])
    want, got = launch.losses(out), launch.losses(out2)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert torch.allclose(d2["after"][emb + "weight_new"], after[emb + "weight_new"], atol=1e-6)

    # The same checkpoint resumed on the untied model of the same shape: refused in one line, before training.
    untied = {**TIED, "model.config": {**TIED["model.config"], "tie_word_embeddings": False}}
    cfg3, out3 = configure(setup, "untied_resume", **{**untied, "optim.max_steps": 6})
    shutil.copytree(out / "checkpoints" / "step-00000003", out3 / "checkpoints" / "step-00000003")
    proc = launch.single(cfg3)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "cannot resume" in ln]
    assert len(lines) == 1 and "tied embeddings" in lines[0] and "untied embeddings" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
