"""engine.frozen_base on 2 processes over gloo: resident (ZeRO-1 of the same config) trains the reference's
curve (ZeRO-3, partitioned); its checkpoint resumes under ZeRO-2 (the layout both share; resident runs saved
before resident was ZeRO-1 are ZeRO-2) and continues the curve; a checkpoint of one choice resumed under the
other is refused naming both."""

from __future__ import annotations

import json
import shutil

import pytest

from . import launch
from .runs import STEPS, configure


def test_resident_trains_the_partitioned_curve_and_refuses_a_partitioned_resume(setup, reference, same_curve,
                                                                                tmp_path):
    # The run of runs.SAME_CURVE: its losses are the reference's (test_train.py compares them).
    out, got, proc = same_curve("resident")
    assert "frozen base resident (as configured; engine.frozen_base)" in proc.stdout
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 1
    assert "frozen base partitioned (auto on the CPU" in reference[2].stdout
    assert sorted(got) == list(range(1, STEPS + 1))

    # The trained tensors of the two checkpoints (DeepSpeed's fp32 reader handles both stages) agree, and the
    # adapter exports from the ZeRO-1 one as from ZeRO-3's.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = f"step-{STEPS:08d}"
    mine, theirs = (get_fp32_state_dict_from_zero_checkpoint(str(d / "checkpoints"), tag=tag,
                                                             exclude_frozen_parameters=True) for d in (out, reference[0]))
    assert mine.keys() == theirs.keys() and any("lora_B" in k for k in mine)
    # Per tensor in norm: element-wise, Adam turns the reduction-order noise of the near-zero gradient of a rarely
    # seen embedding row into a visible step (measured: 5 of 187,712 new-row elements off by up to 1.1e-4, the
    # tensor's relative difference 6e-5; LoRA tensors 1e-7 to 3e-6).
    for k in mine:
        assert float((mine[k] - theirs[k]).norm() / theirs[k].norm()) < 2e-4, k
    proc = launch.cllama("export", "adapter", "--run", str(out), "--out", str(tmp_path / "adapter"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 4 * sum(t.numel() for t in mine.values())

    # Its step-5 checkpoint resumed under ZeRO-2 (deepspeed_configs/zero2.json): DeepSpeed reads the ZeRO-1 files
    # and the curve goes on (ZeRO-2 reduces every micro-batch, ZeRO-1 once per step: the same sums in fp32 up to
    # their order).
    cfg3, out3 = configure(setup, "resident_as_zero2", **{"engine.deepspeed_config": "deepspeed_configs/zero2.json",
                                                          "validation.every": 0, "checkpoint.save_every": 5})
    shutil.copytree(out / "checkpoints" / "step-00000005", out3 / "checkpoints" / "step-00000005")
    proc = launch.run(cfg3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "DeepSpeed ZeRO-2" in proc.stdout
    resumed = launch.losses(out3)
    assert sorted(resumed) == list(range(6, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(got[step], abs=1e-5), step

    # Its checkpoint under the other choice: refused in one line naming both, nothing touched.
    cfg2, out2 = configure(setup, "resident_to_partitioned", **{"engine.frozen_base": "partitioned"})
    shutil.copytree(out / "checkpoints", out2 / "checkpoints")
    proc = launch.in_process(cfg2)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("saved under ZeRO-1 (engine.frozen_base: resident), this run is ZeRO-3 (engine.frozen_base: "
            "partitioned)") in proc.stderr and "Traceback" not in proc.stderr
