"""engine.frozen_base: the auto decision table, the ZeRO-1 rewrite that keeps the base resident, the refusal."""

from __future__ import annotations

import pytest

from cllama_dist.config import build
from cllama_dist.errors import UserError
from cllama_dist.trainer.config import EngineConfig, TrainConfig
from cllama_dist.trainer.engine import (GRADIENT_BYTES, OPTIMIZER_STATE_BYTES, RESIDENT_STAGE, FrozenBase,
                                        choose_frozen_base, expected_bytes, make_resident, read_deepspeed_json)
from cllama_dist.trainer.engine import resolve as deepspeed_config
from cllama_dist.trainer.plan import Plan

GiB = 2**30
ZERO3 = {"stage": 3}
# The 1.1B benchmark model at 49,953 rows: about 1.2e9 parameters, 2 bytes each in bf16; 19M trainable.
P_1B, T_1B = 1_200_000_000, 19_000_000


def engine(**kw) -> EngineConfig:
    return build(EngineConfig, kw)


def decide(eng: EngineConfig, zero=ZERO3, world=1, cuda=True, params=P_1B, trainable=T_1B, free=80 * GiB,
           resume=None):
    calls = []

    def sizes():
        calls.append("sizes")
        return params, trainable, 2

    def free_bytes():
        calls.append("free")
        return free

    got = choose_frozen_base(eng, zero, world, cuda, sizes, free_bytes, resume)
    return got.choice, got.reason, got.stage, calls


# One process's resident bytes of the 1.1B: bf16 weights, whole gradients, the optimizer state's share.
RESIDENT_1B = 2 * P_1B + (GRADIENT_BYTES + OPTIMIZER_STATE_BYTES) * T_1B


@pytest.mark.parametrize("case,kw,expect,stage,why", [
    # Forced either way: no sizes, no memory query.
    ("forced resident", dict(eng={"frozen_base": "resident"}), "resident", 1, "as configured"),
    ("forced partitioned", dict(eng={"frozen_base": "partitioned"}), "partitioned", 3, "as configured"),
    # auto on a GPU: 2.4 GB + 16 B x 19M = 2.5 GiB against half of the free memory.
    ("fits", dict(free=80 * GiB), "resident", 1, "fit in half of the 80.0 GiB free"),
    ("just fits", dict(free=2 * RESIDENT_1B), "resident", 1, "fit in half"),
    ("just too big", dict(free=2 * RESIDENT_1B - 1), "partitioned", 3, "exceed half"),
    # 70B in bf16 (140 GB) on an 80 GB card: partitioned.
    ("70B", dict(params=70_000_000_000, trainable=200_000_000, world=8), "partitioned", 3, "exceed half"),
    # 7B on 8 x 80 GB: the optimizer share is divided by the world size.
    ("7B", dict(params=6_900_000_000, trainable=170_000_000, world=8), "resident", 1, "fit in half"),
    # auto on the CPU: today's behaviour, ZeRO-3 as configured.
    ("cpu", dict(cuda=False), "partitioned", 3, "auto on the CPU"),
    ("offload", dict(zero={"stage": 3, "offload_param": {"device": "cpu"}}), "partitioned", 3, "offloads parameters"),
    ("zero2 json", dict(zero={"stage": 2}), "resident", 2, "is ZeRO-2, which never partitions"),
    # Resuming, auto follows the checkpoint's stage (a ZeRO-3 run of earlier versions resumes, not refused), and
    # a resident run keeps the stage it was saved under (ZeRO-2 before resident became ZeRO-1).
    ("resume zero3", dict(resume=3), "partitioned", 3, "saved under ZeRO-3"),
    ("resume zero2 on cpu", dict(resume=2, cuda=False), "resident", 2, "saved under ZeRO-2"),
    ("resume zero1 on cpu", dict(resume=1, cuda=False), "resident", 1, "saved under ZeRO-1"),
    ("resume forced", dict(eng={"frozen_base": "resident"}, resume=3), "resident", 1, "as configured"),
    ("resume forced zero2", dict(eng={"frozen_base": "resident"}, resume=2), "resident", 2, "as configured"),
    ("resume partitioned", dict(eng={"frozen_base": "partitioned"}, resume=2), "partitioned", 3, "as configured"),
    # The legacy key: resident (its own ZeRO-2) on one process, unchanged (partitioned) with several.
    ("legacy one", dict(eng={"single_process_zero2": True}), "resident", 2, "single_process_zero2 on one process"),
    ("legacy two", dict(eng={"single_process_zero2": True}, world=2), "partitioned", 3, "one process only"),
    ("legacy resume zero3", dict(eng={"single_process_zero2": True}, resume=3), "resident", 2, "one process"),
    ("legacy resume zero1", dict(eng={"single_process_zero2": True}, resume=1), "resident", 1, "one process"),
])
def test_auto_decision_table(case, kw, expect, stage, why):
    eng = engine(**kw.pop("eng", {}))
    choice, reason, got_stage, calls = decide(eng, **kw)
    assert (choice, got_stage) == (expect, stage), (case, reason)
    assert why in reason, (case, reason)
    # Sizes and free memory (a collective) are asked for only when auto decides on a GPU.
    decides = eng.frozen_base == "auto" and not eng.single_process_zero2 and kw.get("cuda", True) \
        and kw.get("zero", ZERO3) == ZERO3 and kw.get("resume") is None
    assert calls == (["sizes", "free"] if decides else []), case


def test_partitioned_on_a_zero2_config_and_the_legacy_contradiction_are_refused():
    with pytest.raises(UserError, match="partitioned needs a ZeRO-3 DeepSpeed config"):
        choose_frozen_base(engine(frozen_base="partitioned"), {"stage": 2}, 1, True)
    with pytest.raises(UserError, match="single_process_zero2: contradicts engine.frozen_base: partitioned"):
        engine(frozen_base="partitioned", single_process_zero2=True)


def test_expected_bytes_per_device():
    # resident: every weight and trainable gradient + this process's share of the fp32 masters and Adam moments;
    # partitioned: a share of all of it.
    assert (GRADIENT_BYTES, OPTIMIZER_STATE_BYTES) == (4, 12)
    assert expected_bytes("resident", 1000, 100, 4, 2) == 2000 + 4 * 100 + 12 * 100 // 4
    assert expected_bytes("partitioned", 1000, 100, 4, 2) == 2000 // 4 + 16 * 100 // 4
    assert expected_bytes("partitioned", 1000, 100, 1, 2) == expected_bytes("resident", 1000, 100, 1, 2)


@pytest.mark.parametrize("name", ["zero3.json", "zero3_offload.json", "zero3_multinode.json"])
def test_resident_is_the_zero3_config_as_zero1(name):
    _, ds = read_deepspeed_json(f"deepspeed_configs/{name}")
    zero = ds["zero_optimization"]
    kept = {k: v for k, v in zero.items()
            if not k.startswith(("stage3_", "zero_hpz", "zero_quantized")) and k not in ("stage", "offload_param")}
    make_resident(zero)
    # ZeRO-1 of the same buckets and overlap, no ZeRO-3 key left (DeepSpeed rejects none, but they would mislead),
    # the optimizer offload kept (ZeRO-1 supports it), the parameter offload dropped (resident means on device).
    assert RESIDENT_STAGE == 1 and zero == {"stage": 1, **kept}
    make_resident(zero, 2)  # a run saved as ZeRO-2 (before resident was ZeRO-1) resumes as it was
    assert zero == {"stage": 2, **kept}


def test_resolve_applies_the_choice():
    plan = Plan(world=2, micro=2, accum=1, block=64, max_steps=10, train_sequences=100)
    cfg = build(TrainConfig, {"model.config": {"vocab_size": 100}})
    assert deepspeed_config(cfg, plan, "bf16", False)["zero_optimization"]["stage"] == 3  # auto, CPU rule
    z = deepspeed_config(cfg, plan, "bf16", False, frozen_base="resident")["zero_optimization"]
    assert z["stage"] == 1 and not [k for k in z if k.startswith("stage3_")]
    z = deepspeed_config(cfg, plan, "bf16", False, frozen_base=FrozenBase("resident", "resumed", 2))
    assert z["zero_optimization"]["stage"] == 2
    forced = build(TrainConfig, {"model.config": {"vocab_size": 100}, "engine.frozen_base": "resident"})
    assert deepspeed_config(forced, plan, "bf16", False)["zero_optimization"]["stage"] == 1


def test_model_sizes_for_auto_are_those_of_the_model_built():
    """What auto weighs on a GPU (counted on the meta device before building) is what is then built."""
    import torch

    from cllama_dist.model.adapters import build_model, count_parameters
    from cllama_dist.model.presets import TINY
    from cllama_dist.trainer.setup import model_sizes

    cfg = build(TrainConfig, {"model.config": {**TINY, "vocab_size": 100}, "lora.rank": 4})
    params, trainable, per_weight = model_sizes(cfg, 120, "bf16")
    model, _ = build_model(cfg.model, cfg.lora, 0, 100, 120, torch.bfloat16)
    c = count_parameters(model)
    assert (params, trainable, per_weight) == (c.total, c.trainable, 2)
