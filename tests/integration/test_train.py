"""The trainer as users run it: 2 processes over gloo, ZeRO-3, a tiny LLaMA, the shipped corpus.

Each test checks results (weights, losses, checkpoints), not only exit codes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from .. import golden
from . import launch
from .runs import SAME_CURVE, STEPS, configure


def test_reference_run_trains_logs_and_checkpoints(reference):
    out, losses, proc = reference
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert sum(losses[s] for s in (9, 10)) < sum(losses[s] for s in (1, 2))  # the loss fell
    evals = launch.metrics(out, "eval")
    assert [e["step"] for e in evals] == [5, 10] and all(e["perplexity"] > 1 for e in evals)
    logged = [r for r in launch.metrics(out, "train") if "tokens_per_s" in r]
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0 and r["grad_norm"] > 0 for r in logged)
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert names == [f"step-{s:08d}" for s in (2, 4, 6, 8, 10)]
    state = json.loads((out / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    assert state["samples_consumed"] == 80 and state["world_size"] == 2 and state["reason"] == "end"
    assert list((out / "tb").iterdir()), "no TensorBoard events"
    assert "2 processes x micro-batch 2 x accumulation 2 = 8 sequences x 64 tokens = 512 tokens per step" in proc.stdout
    assert "G conventional (6N + 12LHs)" in proc.stdout
    # The curve itself, against the figures recorded at 1900eb9 (before the trainer became components).
    golden.check("train_reference", {"train": losses, "eval": {e["step"]: e["loss"] for e in evals}}, abs=1e-5)


def test_universal_resume_of_a_reference_checkpoint_on_one_process(setup, reference):
    """The reference's step-4 checkpoint (2 processes) resumed on 1 process: a deterministic 2 -> 1 curve."""
    import shutil

    cfg, out = configure(setup, "universal")
    shutil.copytree(reference[0] / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004")
    proc = launch.run(cfg, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and (out / "checkpoints" / "step-00000004.universal").is_dir()
    got = launch.losses(out)
    assert sorted(got) == list(range(5, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(reference[1][step], abs=1e-5), step
    golden.check("train_universal_2to1", {"train": got}, abs=1e-5)


def test_only_lora_and_new_rows_change(setup, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    cfg, out = configure(setup, "probe", **{"optim.max_steps": 4, "checkpoint.save_every": 0, "validation.every": 0,
                                            "model.new_row_init": "subword"})
    dump = tmp_path / "probe.pt"
    probe = Path(__file__).with_name("probe_train.py")
    proc = launch.run(cfg, script=probe, extra=[str(dump)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = torch.load(dump, weights_only=False)
    before, after, trainable = d["before"], d["after"], d["trainable"]
    base = load_file(tiny_model_dir / "model.safetensors")
    prefix = "base_model.model."
    emb, head = prefix + "model.embed_tokens.", prefix + "lm_head."
    # The old rows are the base model's, bit for bit, before and after training.
    assert torch.equal(after[emb + "weight_base"], base["model.embed_tokens.weight"])
    assert torch.equal(after[head + "weight_base"], base["lm_head.weight"])
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable  # every trainable tensor moved, nothing else did
    assert {emb + "weight_new", head + "weight_new"} <= changed
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    for name, value in after.items():  # every frozen weight equals the base model's
        if name not in trainable and "lora_" not in name and "weight_base" not in name:
            assert torch.equal(value, base[name[len(prefix):].replace(".base_layer", "")]), name
    # subword initialisation: a new row starts as the mean of the base rows of its spelling in the base.
    import sentencepiece as spm

    from cllama_dist.model.vocab import subword_ids_for

    _, tok, _, _ = setup
    base_sp = spm.SentencePieceProcessor(model_file=str(json.loads((tok / "merge_report.json").read_text())["base"]["path"]))
    merged = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    orig = base_sp.get_piece_size()
    spelled = subword_ids_for([merged.id_to_piece(i) for i in range(orig, orig + 50)], base_sp)
    for i, ids in enumerate(spelled):
        expected = base["model.embed_tokens.weight"][ids].mean(0) if ids else base["model.embed_tokens.weight"].mean(0)
        assert torch.allclose(before[emb + "weight_new"][i], expected, atol=1e-6)
    # Optimizer state covers the trainable parameters alone (plus ZeRO's alignment padding).
    counts = d["counts"]
    assert counts["trainable"] <= d["optimizer_numel"] < counts["trainable"] + 4096
    assert counts["trainable"] == counts["lora"] + counts["new_rows"]


@pytest.mark.parametrize("name", list(SAME_CURVE))
def test_runs_that_change_how_not_what_train_the_reference_curve(same_curve, reference, name):
    """runs.SAME_CURVE, one launch each: without gradient checkpointing, a resident base (ZeRO-1), and two processes
    started the way `srun` starts them (SLURM_* only, no launcher) building the model from its config."""
    out, got, proc = same_curve(name)
    want, tolerance = reference[1], SAME_CURVE[name].abs
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=tolerance, rel=0), step
    assert "2 processes x micro-batch 2" in proc.stdout


def test_kill_at_a_random_step_then_resume_auto_continues_exactly(setup, reference):
    import random

    cfg, out = configure(setup, "killed")
    proc = launch.start(cfg, log=out.with_suffix(".log"))
    kill_at = random.Random().randint(3, 8)
    launch.wait_for_step(out, kill_at, proc)
    launch.kill_job(proc)
    seen = max(launch.losses(out))
    assert seen < STEPS, "the run finished before it could be killed"
    proc = launch.run(cfg)  # resume: auto is the default
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed_from = int(proc.stdout.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed_from <= seen and resumed_from % 2 == 0
    # Bit for bit the uninterrupted curve, and each step logged once: nothing replayed or skipped.
    assert launch.losses(out) == reference[1]
    steps = [r["step"] for r in launch.metrics(out, "train")]
    assert steps == sorted(set(steps))


def test_signal_saves_mid_run_and_resume_on_one_process_matches(setup, reference):
    cfg, out = configure(setup, "signalled")
    proc = launch.start(cfg, log=out.with_suffix(".log"))
    launch.wait_for_step(out, 3, proc)
    for pid in launch.workers(proc):  # what Slurm's --signal does: every task gets SIGUSR1
        subprocess.run(["kill", "-USR1", str(pid)])
    assert proc.wait(timeout=300) != 0  # torchrun reports the workers' exit status 3
    stopped = launch.metrics(out, "train")[-1]["step"]
    assert stopped < STEPS
    ckpt = out / "checkpoints" / f"step-{stopped:08d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["reason"] == "signal" and state["samples_consumed"] == stopped * 8
    # Resume on 1 process: same global batch (accumulation 4), via a universal checkpoint.
    proc = launch.run(cfg, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / f"step-{stopped:08d}.universal").is_dir()
    got, ref = launch.losses(out), reference[1]
    assert got.keys() == ref.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), step


def test_nonfinite_losses_are_skipped_then_stop_the_run(setup):
    """Under both frozen_base choices: ZeRO-3 reduces each micro-batch's gradients into its partitions, ZeRO-1
    (resident) accumulates them in place until the step's last micro-batch; a skipped step's gradients must be
    gone from both before the next step, so the two runs' losses after the skip agree."""
    losses = {}
    for fb in ("partitioned", "resident"):
        cfg, out = configure(setup, f"nonfinite_{fb}", **{"optim.max_nonfinite_steps": 3, "checkpoint.save_every": 0,
                                                          "validation.every": 0, "logging.log_every": 1,
                                                          "engine.frozen_base": fb})
        # The fault is injected by a test-only subclass of the trainer (tests/integration/fault_train.py): NaN in
        # the last micro-batch of steps 4, 7, 8, 9, after the earlier micro-batches' backward.
        proc = launch.run(cfg, launcher="deepspeed", script=launch.FAULTY,
                          extra=["--fault-nonfinite-steps", "4", "7", "8", "9"])
        assert proc.returncode == 4, proc.stderr[-3000:]
        assert "step 4: non-finite loss, step skipped (1 in a row)" in proc.stdout
        assert "stopping: 3 non-finite losses in a row" in proc.stdout
        recs = {r["step"]: r for r in launch.metrics(out, "train")}
        assert recs[4].get("skipped") and not recs[5].get("skipped") and recs[9].get("skipped")
        state = json.loads((out / "checkpoints" / "step-00000009" / "trainer_state.json").read_text())
        assert state["reason"] == "non-finite loss"
        losses[fb] = {s: r["loss"] for s, r in recs.items() if not r.get("skipped")}
    assert sorted(losses["resident"]) == sorted(losses["partitioned"]) == [1, 2, 3, 5, 6]
    for step, want in losses["partitioned"].items():  # step 6 follows step 5's update: no gradient of step 4 in it
        assert losses["resident"][step] == pytest.approx(want, abs=1e-5), step


def test_mismatched_shards_are_refused_before_training(setup, tiny_base, tmp_path):
    from cllama_dist.assets import corpus_path
    from cllama_dist.data.config import PreprocessConfig
    from cllama_dist.data.preprocess import preprocess

    other = tmp_path / "other_shards"
    preprocess(PreprocessConfig(inputs=[str(corpus_path())], tokenizer=str(tiny_base), output=str(other),
                                block_size=64, workers=1))
    cfg, out = configure(setup, "mismatch", **{"data.path": str(other)})
    proc = launch.single(cfg)
    assert proc.returncode == 2
    assert "do not match this run" in proc.stderr and "vocab size: shards 1,000, tokenizer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "checkpoints").exists()


def test_a_checkpoint_of_another_zero_stage_is_refused(setup, reference):
    import shutil

    cfg, out = configure(setup, "stage_change", **{"engine.single_process_zero2": True})
    shutil.copytree(reference[0] / "checkpoints", out / "checkpoints")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = launch.in_process(cfg)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("saved under ZeRO-3 (engine.frozen_base: partitioned), this run is ZeRO-2 (engine.frozen_base: resident)"
            in proc.stderr) and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing lost


def test_export_adapter_and_merged_model_load_with_stock_libraries(reference, tiny_model_dir, tiny_base, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cllama_dist.config import build
    from cllama_dist.model.adapters import build_model
    from cllama_dist.trainer.config import TrainConfig

    run = reference[0]
    out = tmp_path / "adapter"
    proc = subprocess.run(["cllama", "export", "adapter", "--run", str(run), "--out", str(out)], capture_output=True,
                          text=True, env=launch.env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((out / "cllama_export.json").read_text())
    state = json.loads((run / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert meta["step"] == STEPS and meta["tokenizer_sha256"] == state["tokenizer_sha256"]
    # The file holds the trained parameters alone, in fp32 (plus the safetensors header).
    size = (out / "adapter_model.safetensors").stat().st_size
    assert 4 * meta["trained_parameters"] < size < 4 * meta["trained_parameters"] + 20_000
    orig, new = state["orig_vocab"], state["new_vocab"]
    assert meta["trained_parameters"] == 2 * (new - orig) * 64 + 16_384  # new rows in both matrices + LoRA

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_rows = base.get_input_embeddings().weight.detach().clone()
    base.resize_token_embeddings(new, mean_resizing=False)
    stock = PeftModel.from_pretrained(base, out).eval()
    cfg = build(TrainConfig, state["config"])
    ours, _ = build_model(cfg.model, cfg.lora, cfg.seed, orig, new, torch.float32)
    trained = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step-{STEPS:08d}",
                                                       exclude_frozen_parameters=True)
    assert not ours.load_state_dict(trained, strict=False).unexpected_keys
    ids = torch.randint(0, new, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, ours.eval()(ids).logits, atol=1e-5)
    merged = stock.merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight[:orig], base_rows)  # old rows are the base's

    # The merged Hugging Face model: stock transformers loads it and computes the adapter's logits.
    from transformers import AutoTokenizer

    from cllama_dist.export import export_merged
    from cllama_dist.errors import UserError

    merged_dir = tmp_path / "merged"
    export_merged(tiny_model_dir, out, merged_dir, dtype="fp32")
    hf = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert hf.config.vocab_size == new == len(AutoTokenizer.from_pretrained(merged_dir))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, stock(ids).logits, atol=1e-5)
    assert torch.equal(hf.get_input_embeddings().weight[:orig], base_rows)

    # Bad input, each refused naming both sides.
    with pytest.raises(UserError, match="no complete checkpoint"):
        from cllama_dist.export import export_adapter
        export_adapter(tmp_path / "no_run", tmp_path / "x")
    wrong = tmp_path / "wrong_vocab"
    AutoModelForCausalLM.from_config(base.config.__class__(**{**base.config.to_dict(), "vocab_size": 999})).save_pretrained(wrong)
    with pytest.raises(UserError, match="vocabulary of 999 rows; the adapter .* extends one of 1,000"):
        export_merged(wrong, out, tmp_path / "m2")
    import shutil

    other_tok = tmp_path / "other_tok_adapter"
    shutil.copytree(out, other_tok)
    shutil.copy(tiny_base / "tokenizer.model", other_tok / "tokenizer.model")
    with pytest.raises(UserError, match="is not the one the adapter .* was trained with"):
        export_merged(tiny_model_dir, other_tok, tmp_path / "m3")

    # cllama eval: base + adapter (stock PEFT) and the merged model give the same figures on the same text.
    from cllama_dist.assets import corpus_path
    from cllama_dist.eval.config import EvalConfig
    from cllama_dist.eval import evaluate

    text = tmp_path / "heldout.jsonl"
    text.write_text("".join(corpus_path().read_text(encoding="utf-8").splitlines(True)[:6]), encoding="utf-8")
    via_cli = subprocess.run(["cllama", "eval", "--model", str(tiny_model_dir), "--adapter", str(out), "--inputs",
                              str(text), "--json-out", str(tmp_path / "eval.json")], capture_output=True, text=True,
                             env=launch.env())
    assert via_cli.returncode == 0, via_cli.stderr[-2000:]
    assert "bits/char" in via_cli.stdout
    with_adapter = json.loads((tmp_path / "eval.json").read_text())
    of_merged = evaluate(EvalConfig(model=str(merged_dir), inputs=[str(text)]))
    assert with_adapter["tokens"] == of_merged["tokens"] and with_adapter["characters"] == of_merged["characters"]
    assert with_adapter["bits_per_char"] == pytest.approx(of_merged["bits_per_char"], rel=1e-5)
    with pytest.raises(UserError, match="not the one the adapter .* was trained with"):
        evaluate(EvalConfig(model=str(tiny_model_dir), adapter=str(out), tokenizer=str(tiny_base), inputs=[str(text)]))
    with pytest.raises(UserError, match="vocabulary of 999 rows"):
        evaluate(EvalConfig(model=str(wrong), adapter=str(out), inputs=[str(text)]))
    wide = tmp_path / "wide"
    AutoModelForCausalLM.from_config(base.config.__class__(**{**base.config.to_dict(), "vocab_size": orig,
                                                              "hidden_size": 128})).save_pretrained(wide)
    with pytest.raises(UserError, match="does not fit the base"):
        evaluate(EvalConfig(model=str(wide), adapter=str(out), inputs=[str(text)]))
