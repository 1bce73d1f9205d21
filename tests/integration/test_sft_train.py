"""Instruction tuning as users run it: the shipped instruction set through `cllama preprocess-sft`, then the same
trainer (2 processes over gloo, ZeRO-3) starting from a merged pre-trained model whose vocabulary is already
extended; export with the chat template; the exported model reproduces the training prompt's ids.

Each test checks results (weights, losses, checkpoints), not only exit codes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from . import launch
from .runs import base_config

STEPS = 8


@pytest.fixture(scope="module")
def merged_model(tiny_model_dir, tiny_merged, tmp_path_factory) -> Path:
    """A "merged pre-trained model": the tiny base with its vocabulary extended to len(tokenizer) and the new
    rows set to distinct values (as pre-training would leave them), saved as a stock Hugging Face folder with the
    merged tokenizer beside it."""
    from transformers import AutoModelForCausalLM

    from cllama_dist.tokenizer.spm import fingerprint

    out = tmp_path_factory.mktemp("merged_pt")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    orig = model.config.vocab_size
    new = fingerprint(tiny_merged / "tokenizer.model")["vocab_size"]
    model.resize_token_embeddings(new, mean_resizing=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[orig:] = torch.randn(new - orig, w.shape[1], generator=g) * 0.02
    model.save_pretrained(out)
    for f in tiny_merged.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    return out


def sft_shards(tok: Path, out: Path, layout: str) -> Path:
    from cllama_dist.data.config import SFTPreprocessConfig
    from cllama_dist.data.sft import preprocess_sft
    from cllama_dist.sft.shipped import train_files

    preprocess_sft(SFTPreprocessConfig(inputs=[str(p) for p in train_files()], tokenizer=str(tok), output=str(out),
                                       max_length=64, layout=layout, validation_fraction=0.1, workers=1))
    return out


@pytest.fixture(scope="module")
def packed(merged_model, tmp_path_factory) -> Path:
    return sft_shards(merged_model, tmp_path_factory.mktemp("sft") / "packed", "packed")


def sft_config(root: Path, name: str, model: Path, shards: Path, **over) -> tuple[Path, Path]:
    out = root / name
    cfg = base_config(model, model, shards, out, **{"optim.max_steps": STEPS, "optim.lr": 3e-3,
                                                   "validation.every": 4, "validation.sequences": 8, **over})
    return launch.write_config(root / f"{name}.yaml", **cfg), out


@pytest.fixture(scope="module")
def sft_reference(merged_model, packed, tmp_path_factory):
    root = tmp_path_factory.mktemp("sftruns")
    cfg, out = sft_config(root, "reference", merged_model, packed)
    dump = root / "probe.pt"
    proc = launch.run(cfg, script=Path(__file__).with_name("probe_train.py"), extra=[str(dump)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, launch.losses(out), proc, torch.load(dump, weights_only=False)


def test_sft_run_learns_responses_and_keeps_every_frozen_weight(sft_reference, merged_model):
    from safetensors.torch import load_file

    root, out, losses, proc, d = sft_reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS - 1] + losses[STEPS] < losses[1] + losses[2]  # the response loss fell
    evals = launch.metrics(out, "eval")
    assert [e["step"] for e in evals] == [4, 8] and evals[-1]["loss"] < evals[0]["loss"] + 1e-9
    assert "already extended" in proc.stdout  # the start from a merged model is said
    base = load_file(merged_model / "model.safetensors")
    orig = json.loads((merged_model / "merge_report.json").read_text())["base"]["vocab_size"]
    p = "base_model.model."
    before, after, trainable = d["before"], d["after"], d["trainable"]
    for key, name in ((p + "model.embed_tokens.", "model.embed_tokens.weight"), (p + "lm_head.", "lm_head.weight")):
        # the LLaMA rows: the merged model's, bit for bit; the Chinese rows start where pre-training left them
        assert torch.equal(after[key + "weight_base"], base[name][:orig])
        assert torch.equal(before[key + "weight_new"], base[name][orig:])
        assert not torch.equal(after[key + "weight_new"], base[name][orig:])
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable
    state = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["template"]["name"] == "alpaca" and state["base_vocab"] == state["new_vocab"]


def test_sft_kill_and_resume_continues_exactly(sft_reference, merged_model, packed):
    root, _, reference, _, _ = sft_reference
    cfg, out = sft_config(root, "killed", merged_model, packed, **{"checkpoint.save_every": 2})
    proc = launch.start(cfg, log=root / "killed.log")
    try:
        launch.wait_for_step(out, 5, proc)
    finally:
        launch.kill_job(proc)
    resumed = launch.run(cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    got = launch.losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(reference[step], abs=1e-6), step


def test_sft_export_carries_the_template_and_stock_loading_gives_the_training_ids(sft_reference, merged_model, packed,
                                                                                  tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cllama_dist.export.run import export_adapter, export_merged

    _, out, _, _, d = sft_reference
    export_adapter(out, tmp_path / "adapter")
    export_merged(merged_model, tmp_path / "adapter", tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = tok.apply_chat_template([{"role": "user", "content": "把“春天来了”倒过来写。"}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.startswith(tok.bos_token + "Below is an instruction") and prompt.endswith("### Response: ")
    # The merged model's rows: LLaMA's untouched, the rest the trained ones.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    orig = json.loads((merged_model / "merge_report.json").read_text())["base"]["vocab_size"]
    base = AutoModelForCausalLM.from_pretrained(merged_model, dtype=torch.float32)
    emb, emb0 = model.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert emb.shape == emb0.shape and torch.equal(emb[:orig], emb0[:orig])
    trained = d["after"]["base_model.model.model.embed_tokens.weight_new"]
    assert torch.equal(emb[orig:], trained)
    # The training prompt of a shipped record (the encoder that wrote the shards), against stock
    # apply_chat_template of the exported folder: the same ids.
    import sentencepiece as spm

    from cllama_dist.sft.encode import encode_conversation
    from cllama_dist.sft.records import single_turn
    from cllama_dist.sft.templates import builtin

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "merged" / "tokenizer.model"))
    for instruction in ("把“春天来了”倒过来写。", "用一句话介绍长城。"):
        enc = encode_conversation(single_turn(instruction, "好的。"), builtin("alpaca"), sp, 512)
        prompt_ids = enc.input_ids[:enc.loss_mask.index(1)]
        stock = tok.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True)
        stock = stock["input_ids"] if hasattr(stock, "keys") else stock
        assert list(stock) == prompt_ids


def test_sft_from_the_base_and_the_pretraining_adapter(setup, reference, packed, tmp_path):
    """model.path = the base, model.adapter = the pre-training run's adapter: merged once into RUN/start-model,
    reused on resume; the run trains on it like on a merged model."""
    from safetensors.torch import load_file

    from cllama_dist.export.run import export_adapter

    base = setup[0]
    export_adapter(reference[0], tmp_path / "pt-adapter")
    cfg, out = sft_config(tmp_path, "from-adapter", base, packed, **{
        "model.tokenizer": str(setup[1]), "model.adapter": str(tmp_path / "pt-adapter"), "optim.max_steps": 2,
        "validation.every": 0, "checkpoint.save_every": 0})
    first = launch.run(cfg, nproc=1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "merged into" in first.stdout and "already extended" in first.stdout
    start = load_file(out / "start-model" / "model.safetensors")
    rows = load_file(tmp_path / "pt-adapter" / "adapter_model.safetensors")
    orig = load_file(base / "model.safetensors")["model.embed_tokens.weight"].shape[0]
    emb = start["model.embed_tokens.weight"]
    assert torch.equal(emb[:orig], load_file(base / "model.safetensors")["model.embed_tokens.weight"])
    new_rows = next(v for k, v in rows.items() if "embed_tokens" in k)
    assert torch.equal(emb[orig:], new_rows)
    again = launch.run(cfg, nproc=1)  # the same run again: finished, but the start model is found and reused
    assert again.returncode == 0 and "merged earlier" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
