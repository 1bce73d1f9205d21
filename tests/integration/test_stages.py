"""Staged schedules (trainer/stages.py): the paper's embeddings-only stage, then LoRA + embeddings.

One uninterrupted two-stage run (2 processes, 4 + 4 steps, on a mixture of Chinese and English: the data
continue through the same mixed order across the boundary) is the reference; a probe of its first stage
alone, resumes before, at and after the boundary, and a 2 -> 1 process resume from inside the first stage are
compared with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from . import launch, test_mixture
from .runs import configure

en_shards = test_mixture.en_shards  # the fixture of the mixture's English set, shared with test_mixture.py


STAGE1 = {"name": "embeddings", "trainable": "embeddings", "steps": 4, "embedding_lr": 1e-2, "warmup_steps": 1}
STAGE2 = {"name": "lora", "trainable": "lora+embeddings", "steps": 4, "lr": 3e-3, "warmup_steps": 1}
OVER = {"optim.max_steps": 0, "validation.every": 0, "logging.log_every": 1, "checkpoint.save_every": 2}


@pytest.fixture(scope="module")
def mix(setup, en_shards):
    """The runs' data: Chinese 0.75 and English 0.25 (data.sets), as dotted overrides."""
    return {"data.path": "", "data.sets": [{"name": "zh", "path": str(setup[2]), "weight": 0.75},
                                           {"name": "en", "path": str(en_shards), "weight": 0.25}]}


@pytest.fixture(scope="module")
def staged(setup, mix):
    cfg, out = configure(setup, "staged", stages=[STAGE1, STAGE2], **OVER, **mix)
    proc = launch.run(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, launch.losses(out), proc


def trained(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The trainable tensors (LoRA + new rows) of a checkpoint, gathered from ZeRO's fp32 partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step-{step:08d}",
                                                    exclude_frozen_parameters=True)


def test_the_embeddings_stage_changes_only_the_new_rows_and_the_next_stage_starts_from_them(setup, mix, staged,
                                                                                             tmp_path):
    out, losses, proc = staged
    assert sorted(losses) == list(range(1, 9))
    assert "stage 1/2 'embeddings': steps 1..4, trains embeddings" in proc.stdout
    assert "stage 2/2 'lora': steps 5..8, trains lora + embeddings" in proc.stdout
    records = launch.metrics(out, "train")
    assert [r["stage"] for r in records] == ["embeddings"] * 4 + ["lora"] * 4
    assert all(r["lr"] == 0 for r in records[:4]) and all(r["lr"] > 0 for r in records[4:])
    assert records[-1]["epochs/en"] > 0 and records[-1]["epochs/zh"] > records[3]["epochs/zh"]  # one mixed order
    # Re-warmed: each stage's first step is at 1/warm-up of its peak (warm-up 1: the peak itself).
    assert records[0]["embedding_lr"] == pytest.approx(1e-2) and records[4]["lr"] == pytest.approx(3e-3)
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["stage"] == "embeddings" and [s["name"] for s in state["schedule"]["stages"]] == ["embeddings", "lora"]

    # The first stage alone, probed: every parameter before and after, gathered.
    cfg, probe_out = configure(setup, "stage1_probe", stages=[STAGE1],
                              **{**OVER, "checkpoint.save_every": 0}, **mix)
    dump = tmp_path / "probe.pt"
    proc = launch.run(cfg, script=Path(__file__).with_name("probe_train.py"), extra=[str(dump)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = torch.load(dump, weights_only=False)
    before, after = d["before"], d["after"]
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    prefix = "base_model.model."
    assert changed == {prefix + "model.embed_tokens.weight_new", prefix + "lm_head.weight_new"}
    lora = [n for n in before if "lora_" in n]
    assert lora and all(torch.equal(before[n], after[n]) for n in lora)  # LoRA bit-identical...
    assert all(not after[n].any() for n in lora if "lora_B" in n)  # ...and zero-effect (B = 0)
    # The same steps as the two-stage run's first stage, and the weights its stage 2 starts from.
    assert launch.losses(probe_out) == {s: losses[s] for s in range(1, 5)}
    at_boundary = trained(out, 4)
    assert at_boundary.keys() <= after.keys()
    for name, value in at_boundary.items():
        assert torch.equal(value, after[name].float()), name
    # Stage 2 trained LoRA and the rows further.
    at_end = trained(out, 8)
    assert any(at_end[n].any() for n in at_end if "lora_B" in n)
    assert all(not torch.equal(at_end[n], at_boundary[n]) for n in at_end)


@pytest.mark.parametrize("at", [2, 4, 6], ids=["before", "at", "after"])
def test_resume_around_the_boundary_continues_exactly(setup, mix, staged, at):
    """Before the boundary (the resumed run crosses it), at it (the checkpoint holds stage 1's last weights and
    stage-1 optimizer state, which stage 2's first step starts afresh), after it (nothing is reset again)."""
    cfg, out = configure(setup, f"staged_resume_{at}", stages=[STAGE1, STAGE2], **OVER, **mix)
    tag = f"step-{at:08d}"
    shutil.copytree(staged[0] / "checkpoints" / tag, out / "checkpoints" / tag)
    proc = launch.run(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"at step {at}" in proc.stdout
    assert launch.losses(out) == {s: staged[1][s] for s in range(at + 1, 9)}  # bit for bit


def test_resume_inside_the_first_stage_on_one_process_crosses_the_boundary(setup, mix, staged):
    cfg, out = configure(setup, "staged_2to1", stages=[STAGE1, STAGE2], **OVER, **mix)
    shutil.copytree(staged[0] / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000002")
    proc = launch.run(cfg, nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step-00000002.universal").is_dir()
    got = launch.losses(out)
    assert sorted(got) == list(range(3, 9))
    for step in got:
        assert got[step] == pytest.approx(staged[1][step], abs=1e-5), step


@pytest.mark.parametrize("stages", [[STAGE1, {**STAGE2, "lr": 1e-3}], []], ids=["other", "none"])
def test_a_resume_under_other_stages_is_refused(setup, mix, staged, stages):
    over = {**OVER, **mix, "optim.max_steps": 0 if stages else 8}  # no stages: the same number of steps
    cfg, out = configure(setup, f"staged_changed_{len(stages)}", stages=stages, **over)
    shutil.copytree(staged[0] / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004")
    proc = launch.in_process(cfg)  # a 2-process checkpoint: refused before its universal form would be made
    assert proc.returncode != 0
    assert "the schedule would change (stages" in proc.stdout + proc.stderr


def test_export_holds_every_stage_s_weights(staged, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cllama_dist.config import build
    from cllama_dist.export import export_merged
    from cllama_dist.model.adapters import build_model
    from cllama_dist.trainer.config import TrainConfig

    run = staged[0]
    adapter = tmp_path / "adapter"
    proc = launch.cllama("export", "adapter", "--run", str(run), "--out", str(adapter))
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((run / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    orig, new = state["orig_vocab"], state["new_vocab"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in n and t.any() for n, t in tensors.items())  # stage 2's LoRA
    # The trained model (LoRA + every stage's rows, from the last checkpoint) = stock PEFT on the adapter = merged.
    cfg = build(TrainConfig, state["config"])
    ours, _ = build_model(cfg.model, cfg.lora, cfg.seed, orig, new, torch.float32)
    assert not ours.load_state_dict(trained(run, 8), strict=False).unexpected_keys
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(new, mean_resizing=False)
    stock = PeftModel.from_pretrained(base, adapter).eval()
    merged_dir = tmp_path / "merged"
    export_merged(tiny_model_dir, adapter, merged_dir, dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = torch.randint(0, new, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.eval()(ids).logits
        assert torch.allclose(stock(ids).logits, want, atol=1e-5)
        assert torch.allclose(merged(ids).logits, want, atol=1e-5)


def test_stages_under_a_resident_base_train_the_same_curve(setup, mix, staged):
    """engine.frozen_base: resident (the ZeRO-3 config run as ZeRO-1: what auto picks on a GPU that holds the
    base): the gates act on ZeRO-1's gradients too, so the embeddings stage leaves LoRA at zero and both stages
    follow the partitioned run's losses."""
    cfg, out = configure(setup, "staged_resident", stages=[STAGE1, STAGE2], **OVER, **mix,
                         **{"engine.frozen_base": "resident"})
    proc = launch.run(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frozen base resident (as configured" in proc.stdout
    got, ref = launch.losses(out), staged[1]
    assert got.keys() == ref.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), step
    at_boundary = trained(out, 4)
    assert all(not at_boundary[n].any() for n in at_boundary if "lora_B" in n)
