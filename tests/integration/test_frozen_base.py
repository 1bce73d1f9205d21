"""engine.frozen_base on 2 processes over gloo: resident (ZeRO-2 of the same config) trains the reference's
curve (ZeRO-3, partitioned), and a checkpoint of one choice resumed under the other is refused naming both."""

from __future__ import annotations

import json
import shutil

import pytest

from . import launch
from .runs import STEPS, configure

pytestmark = pytest.mark.integration


def test_resident_trains_the_partitioned_curve_and_refuses_a_partitioned_resume(setup, reference):
    cfg, out = configure(setup, "resident", **{"engine.frozen_base": "resident", "validation.every": 0,
                                               "checkpoint.save_every": 5})
    proc = launch.run(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frozen base resident (as configured; engine.frozen_base)" in proc.stdout
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert "frozen base partitioned (auto on the CPU" in reference[2].stdout
    got, want = launch.losses(out), reference[1]
    assert sorted(got) == list(range(1, STEPS + 1))
    # The same arithmetic up to the order of the gradient reductions (fp32 on the CPU).
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-5), step

    # Its checkpoint under the other choice: refused in one line naming both, nothing touched.
    cfg2, out2 = configure(setup, "resident_to_partitioned", **{"engine.frozen_base": "partitioned"})
    shutil.copytree(out / "checkpoints", out2 / "checkpoints")
    proc = launch.single(cfg2)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("saved under ZeRO-2 (engine.frozen_base: resident), this run is ZeRO-3 (engine.frozen_base: "
            "partitioned)") in proc.stderr and "Traceback" not in proc.stderr
