"""The trainer's pieces that need no processes: batch plan, schedule, data order, checkpoints on disk,
Slurm mapping, FLOPs, DeepSpeed config filling, dry-run counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cllama_dist import distributed
from cllama_dist.config import build
from cllama_dist.data.config import DataConfig
from cllama_dist.data.loader import GlobalOrder, eval_batches, step_positions
from cllama_dist.errors import UserError
from cllama_dist.model.flops import Arch, flops_per_token, peak_tflops
from cllama_dist.trainer import checkpoint
from cllama_dist.trainer.checkpoint import Checkpointer
from cllama_dist.trainer.config import CheckpointConfig, OptimConfig, TrainConfig
from cllama_dist.trainer.engine import resolve as deepspeed_config
from cllama_dist.trainer.plan import Plan, lr_factor

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
LLAMA_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40, vocab_size=32000, max_position_embeddings=2048)


def cfg(**kw) -> TrainConfig:
    """A run config from dotted keys (``cfg(**{"optim.lr": 1e-4})``) or the flat keys of earlier versions."""
    return build(TrainConfig, {"model.config": {"vocab_size": 100}, **kw})


def test_plan_derives_accumulation_from_the_global_batch():
    data = DataConfig(micro_batch_size=2, global_batch_size=16)
    p = Plan.make(data, 0, world=4, block=512, train_sequences=1000)
    assert (p.accum, p.global_batch, p.tokens_per_step, p.max_steps) == (2, 16, 8192, 62)
    assert Plan.make(data, 0, 1, 512, 1000).accum == 8
    with pytest.raises(UserError, match="not a multiple"):
        Plan.make(DataConfig(micro_batch_size=3, global_batch_size=16), 0, 2, 512, 1000)
    assert Plan.make(DataConfig(grad_accum=3), 7, 2, 64, 10).global_batch == 6


def test_schedule_warms_up_then_decays_to_the_floor():
    c = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c, 100) == pytest.approx(0.1) and lr_factor(9, c, 100) == pytest.approx(1.0)
    assert lr_factor(10, c, 100) == pytest.approx(1.0)
    assert lr_factor(100, c, 100) == pytest.approx(0.1) and lr_factor(55, c, 100) == pytest.approx(0.55)
    values = [lr_factor(s, c, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_step_positions_cover_the_step_once_whatever_the_world_size():
    for world, micro in ((1, 2), (2, 2), (4, 1), (8, 1)):
        got = np.concatenate([p for r in range(world) for p in step_positions(3, 8, micro, r, world)])
        assert sorted(got.tolist()) == list(range(24, 32))


def test_global_order_is_a_seeded_permutation_per_epoch():
    o = GlobalOrder(10, seed=1)
    first = o.indices(np.arange(10))
    assert sorted(first.tolist()) == list(range(10))
    assert not np.array_equal(first, o.indices(np.arange(10, 20)))  # a new permutation each epoch
    assert np.array_equal(GlobalOrder(10, seed=1).indices(np.arange(25)), o.indices(np.arange(25)))
    assert not np.array_equal(GlobalOrder(10, seed=2).indices(np.arange(10)), first)


def test_eval_batches_are_equal_in_number_on_every_rank():
    per_rank = [eval_batches(5, 2, r, 2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    seen = [int(i) for rank in per_rank for idx, w in rank for i, wt in zip(idx, w) if wt > 0]
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_slurm_variables_are_mapped_for_plain_srun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NODELIST": "127.0.0.1"}
    assert distributed.map_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_PORT"] == str(20000 + 1234) and env["MASTER_ADDR"]
    launched = {"RANK": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}
    assert not distributed.map_slurm_env(launched) and launched["RANK"] == "0"  # torchrun's own ranks win


def test_flops_formula_by_hand():
    a = Arch(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=100)
    layer = 2 * 64 + 2 * 8 * 4 + 3 * 8 * 16  # q,o + k,v (kv_dim 4) + MLP
    assert a.layer_params == 2 * layer and a.head_params == 800
    n = 2 * layer + 800 + 10
    f = flops_per_token(a, seq_len=32, lora_params=10, trainable_head_rows=5, checkpointing=True)
    attention = 4 * 2 * 8 * 32
    assert f["actual"] == 4 * n + 2 * (10 + 40) + 2 * (2 * layer + 10) + 4 * attention
    assert f["conventional"] == 6 * n + 12 * 2 * 8 * 32
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("cpu") == 0.0


def test_only_complete_checkpoints_count(tmp_path):
    root = checkpoint.root(tmp_path)
    (root / "step-00000002").mkdir(parents=True)
    (root / "step-00000002" / checkpoint.STATE).write_text(json.dumps({"step": 2}))
    (root / "step-00000004.tmp").mkdir()  # a save that crashed
    (root / "step-00000006").mkdir()      # no trainer_state.json: incomplete
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-00000002"]

    def find(run, resume):
        return Checkpointer(run, CheckpointConfig(resume=resume)).find_resume()

    assert find(tmp_path, "auto").name == "step-00000002"
    with pytest.raises(UserError, match="already has checkpoints"):
        find(tmp_path, "")
    with pytest.raises(UserError, match="cannot resume .*step-00000006: no trainer_state.json"):
        find(tmp_path, str(root / "step-00000006"))
    assert find(tmp_path / "fresh", "auto") is None


def _checkpoint(root, step: int, files: dict[str, bytes]):
    d = root / checkpoint.step_name(step)
    d.mkdir(parents=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / checkpoint.STATE).write_text(json.dumps({"step": step}))
    checkpoint.write_file_list(d)
    return d


def test_resume_auto_falls_back_to_the_newest_valid_checkpoint_saying_why(tmp_path):
    root = checkpoint.root(tmp_path)
    files = {"zero_pp_rank_0_mp_rank_00_optim_states.pt": b"a" * 100, "zero_pp_rank_1_mp_rank_00_optim_states.pt": b"b" * 100}
    good = _checkpoint(root, 2, files)
    lost = _checkpoint(root, 4, files)
    (lost / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # a rank's file lost
    cut = _checkpoint(root, 6, files)
    with open(cut / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(10)  # a full disk
    flipped = _checkpoint(root, 8, files)
    (flipped / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"c" * 100)  # same size, other bytes
    c = Checkpointer(tmp_path, CheckpointConfig(resume="auto"))
    assert c.find_resume() == good
    assert [n.split(": ", 2)[-1] for n in c.notes] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its sha256 (damaged)",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt has 10 bytes, 100 were written (truncated?)",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"]
    assert all(str(p) in n for p, n in zip((flipped, cut, lost), c.notes))
    with pytest.raises(UserError, match="cannot resume .*step-00000004: zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"):
        Checkpointer(tmp_path, CheckpointConfig(resume=str(lost))).find_resume()
    (good / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(UserError, match="has checkpoints but none is valid"):
        Checkpointer(tmp_path, CheckpointConfig(resume="auto")).find_resume()


def test_deepspeed_config_is_filled_from_the_run_config(tmp_path):
    plan = Plan(world=2, micro=2, accum=4, block=64, max_steps=10, train_sequences=100)
    ds = deepspeed_config(cfg(**{"optim.clip_grad": 0.5, "engine.deepspeed_overrides": {
        "zero_optimization": {"stage3_param_persistence_threshold": 0}}}), plan, "bf16", universal=True)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (16, 4, 0.5)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["checkpoint"]["load_universal"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 3}}))
    with pytest.raises(UserError, match="train_batch_size is 32, but the run config gives 16"):
        deepspeed_config(cfg(**{"engine.deepspeed_config": str(bad)}), plan, "fp32", False)
    with pytest.raises(UserError, match="not found"):
        deepspeed_config(cfg(**{"engine.deepspeed_config": str(tmp_path / "none.json")}), plan, "fp32", False)


def test_single_process_zero2_applies_to_one_process_only():
    one = Plan(world=1, micro=2, accum=1, block=64, max_steps=10, train_sequences=100)
    two = Plan(world=2, micro=2, accum=1, block=64, max_steps=10, train_sequences=100)
    on = cfg(**{"engine.single_process_zero2": True})
    z = deepspeed_config(on, one, "bf16", False)["zero_optimization"]
    assert z["stage"] == 2 and not [k for k in z if k.startswith("stage3_")] and z["overlap_comm"]
    assert deepspeed_config(on, two, "bf16", False)["zero_optimization"]["stage"] == 3
    assert deepspeed_config(cfg(), one, "bf16", False)["zero_optimization"]["stage"] == 3  # off by default


def test_config_checks_at_start_up():
    with pytest.raises(UserError, match="model.config"):
        TrainConfig()
    with pytest.raises(UserError, match="data.micro_batch_size: must be at least 1"):
        cfg(**{"data.micro_batch_size": 0})
    with pytest.raises(UserError, match="optim.adam_betas: needs two values"):
        cfg(**{"optim.adam_betas": [0.9]})


@pytest.mark.parametrize("arch,total,full_trainable", [
    # Hand counts. 7B: 6,738,415,616 at 32,000 rows + 2 x 17,953 x 4,096 new rows = 6,885,486,592, plus LoRA
    # r 8 on q,k,v,o (8 x 8,192 each) and gate,up,down (8 x 15,104 each): 624,640 per layer x 32 = 19,988,480.
    (LLAMA_7B, 6_905_475_072, 429_203_456),
    # 13B: 13,015,864,320 + 2 x 17,953 x 5,120 = 13,199,703,040, plus LoRA 782,336 per layer x 40 = 31,293,440.
    (LLAMA_13B, 13_230_996_480, 2 * 49_953 * 5_120 + 31_293_440),
])
def test_dry_run_counts(arch, total, full_trainable):
    from cllama_dist.model.adapters import dry_run

    from cllama_dist.model.config import LoraConfig, ModelConfig

    counts = dry_run(ModelConfig(config=arch), LoraConfig(rank=8), new_vocab=49_953)
    full, rows = counts["full"], counts["new-rows"]
    assert full.total == rows.total == total
    assert full.trainable == full_trainable
    assert rows.trainable == rows.lora + 2 * 17_953 * arch["hidden_size"]
    if arch is LLAMA_7B:
        assert round(100 * full.share, 2) == 6.22  # the paper's figure
        assert rows.optimizer_bytes(True) == 12 * rows.trainable


def test_each_process_takes_its_own_gpu_however_slurm_binds_them(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.cuda_device(visible=8) == 3   # every GPU of the node visible: the local rank's
    assert distributed.cuda_device(visible=1) == 0   # --gpus-per-task=1: the one it sees
    with pytest.raises(UserError, match="local rank 3 but this process sees 2 GPUs"):
        distributed.cuda_device(visible=2)


def test_a_resume_with_document_mask_switched_is_refused_naming_it(tmp_path):
    from cllama_dist.errors import UserError
    from cllama_dist.trainer.checkpoint import Checkpointer

    from cllama_dist.trainer.state import RunIdentity

    def mine(document_mask: bool) -> RunIdentity:
        return RunIdentity(global_batch=8, tokenizer={"sha256": "ab"}, embeddings="new-rows", block_size=64,
                           zero_stage=3, base_model={}, mixture=[], document_mask=document_mask, shards=[], schedule={})

    state = {"document_mask": False, "step": 4}
    Checkpointer.check_resumable(tmp_path, state, mine(False))
    Checkpointer.check_resumable(tmp_path, {"step": 4}, mine(True))  # older checkpoints lack the key
    with pytest.raises(UserError, match="its document_mask is False, this run's is True"):
        Checkpointer.check_resumable(tmp_path, state, mine(True))
