"""A tied model (lm_head = embed_tokens) with padding rows, trained by 2 processes under ZeRO-3 (partitioned, the
CPU default): one block of new rows serves both ends and stays one Parameter, the old rows stay bit-identical,
a resume continues the loss and keeps the tie; a resume on an untied model is refused in one line
(DESIGN B6, B7)."""

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
    counts = d["counts"]
    assert counts["trainable"] <= d["optimizer_numel"] < counts["trainable"] + 4096  # the new rows once
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

    export_is_tied(out, after[emb + "weight_new"], before[emb + "weight_base"], tmp_path)

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


def export_is_tied(run: Path, trained_rows: torch.Tensor, base_rows: torch.Tensor, tmp_path: Path) -> None:
    """The run's adapter and merged model: one matrix, tie_word_embeddings kept, the old rows bit-identical, the
    trained rows in place; stock PEFT (the adapter on the base) gives the trained model's logits, and stock
    transformers (the merged folder) the same."""
    import subprocess

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from cllama_dist.config import build
    from cllama_dist.export import export_merged
    from cllama_dist.model.adapters import build_model
    from cllama_dist.trainer.config import TrainConfig

    base = tmp_path / "base"
    torch.manual_seed(0)  # the run's seed: the weights the trainer built from model.config
    LlamaForCausalLM(LlamaConfig(**TIED["model.config"])).save_pretrained(base)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    proc = subprocess.run(["cllama", "export", "adapter", "--run", str(run), "--out", str(adapter)],
                          capture_output=True, text=True, env=launch.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((adapter / "adapter_config.json").read_text())["trainable_token_indices"].keys() == {"embed_tokens"}
    export_merged(base, adapter, merged, dtype="fp32")
    config = json.loads((merged / "config.json").read_text())
    n_base, total = base_rows.shape[0], base_rows.shape[0] + trained_rows.shape[0]
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == total
    weights = load_file(merged / "model.safetensors")
    assert "lm_head.weight" not in weights  # one matrix
    emb = weights["model.embed_tokens.weight"]
    assert torch.equal(emb[:n_base], base_rows) and torch.equal(emb[n_base:], trained_rows)
    record = json.loads((merged / "cllama_export.json").read_text())
    assert (record["tied"], record["rows"], record["base_rows"]) == (True, total, ROWS)

    # The trained model itself: built as the run built it, the checkpoint's trained tensors loaded.
    state = json.loads((run / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    cfg = build(TrainConfig, state["config"])
    ours, _ = build_model(cfg.model, cfg.lora, cfg.seed, state["orig_vocab"], state["new_vocab"], torch.float32)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step-00000006",
                                                       exclude_frozen_parameters=True)
    assert not ours.load_state_dict(trained, strict=False).unexpected_keys
    plain = AutoModelForCausalLM.from_pretrained(base)
    plain.resize_token_embeddings(total, mean_resizing=False)
    stock = PeftModel.from_pretrained(plain, adapter).eval()
    hf = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ids = torch.randint(0, state["new_vocab"], (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.eval()(ids).logits
        assert torch.allclose(stock(ids).logits, want, atol=1e-5)
        assert torch.allclose(hf(ids).logits, want, atol=1e-5)


def test_tied_model_under_the_resident_frozen_base(setup, tmp_path):
    """engine.frozen_base: resident (ZeRO-1): the same one block of rows, the tie and the old rows kept."""
    cfg, _ = configure(setup, "tied_resident", **{**TIED, "optim.max_steps": 3, "checkpoint.save_every": 0,
                                                  "engine.frozen_base": "resident"})
    d = probe(cfg, tmp_path / "resident.pt")
    emb = "base_model.model.model.embed_tokens."
    assert d["tied"] == [True, True]
    assert torch.equal(d["before"][emb + "weight_base"], d["after"][emb + "weight_base"])
    assert not torch.equal(d["before"][emb + "weight_new"], d["after"][emb + "weight_new"])
    assert {n for n in d["trainable"] if "lora_" not in n} == {emb + "weight_new"}
    counts = d["counts"]
    assert counts["trainable"] <= d["optimizer_numel"] < counts["trainable"] + 4096  # the new rows once
