"""What a careless operator or a failing machine does to training and export: nothing lost, nothing silently
wrong, no hang, no traceback. 2 processes over gloo, the tiny model (see runs.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cllama_dist.files import LOCK, Lock

from . import launch
from .runs import STEPS, configure


def _one_line_error(stderr: str, *needles: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [l for l in stderr.splitlines() if "error:" in l]
    assert lines, stderr[-3000:]
    for n in needles:
        assert n in lines[-1], lines[-1]
    return lines[-1]


def test_a_second_training_into_a_live_run_folder_is_refused(setup):
    cfg, out = configure(setup, "locked")
    out.mkdir(parents=True)
    with Lock(out / LOCK, "training run"):  # a live writer: this process
        proc = launch.in_process(cfg)
    assert proc.returncode == 2
    _one_line_error(proc.stderr, f"is being written by another training run: pid {os.getpid()}")
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_resuming_on_another_base_model_is_refused_naming_both(setup, reference, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model, *_ = setup
    other = tmp_path / "other_base"  # the same shape, other weights
    m = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight.mul_(1.01)
    m.save_pretrained(other)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if (Path(model) / name).exists():
            shutil.copy(Path(model) / name, other / name)
    cfg, out = configure(setup, "other_base", **{"model.path": str(other)})
    shutil.copytree(reference[0] / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004")
    proc = launch.in_process(cfg)
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "it was trained on the base", str(model), f"this run's base is {other}")


def test_damaged_checkpoints_are_skipped_and_the_run_continues_exactly(setup, reference):
    cfg, out = configure(setup, "damaged")
    shutil.copytree(reference[0] / "checkpoints", out / "checkpoints")
    shutil.copy(reference[0] / "metrics.jsonl", out / "metrics.jsonl")
    ckpts = out / "checkpoints"
    (ckpts / "step-00000010" / "trainer_state.json").unlink()  # an interrupted save: not even a candidate
    rank_files = sorted((ckpts / "step-00000008").rglob("*optim_states.pt"))
    rank_files[-1].unlink()  # one rank's file lost
    victim = sorted((ckpts / "step-00000006").rglob("*optim_states.pt"))[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)  # a full disk
    proc = launch.run(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipping checkpoint {ckpts / 'step-00000008'}: {rank_files[-1].relative_to(ckpts / 'step-00000008')} is missing" \
        in proc.stdout
    assert f"skipping checkpoint {ckpts / 'step-00000006'}: " in proc.stdout and "truncated?" in proc.stdout
    assert "resumed from" in proc.stdout and "step-00000004 at step 4" in proc.stdout
    assert launch.losses(out) == reference[1]  # bit for bit, each step once
    # Export checks the same way: the newest valid checkpoint.
    from cllama_dist.export.run import pick_checkpoint

    assert pick_checkpoint(out, None).name == "step-00000010"


def test_a_damaged_newest_checkpoint_is_set_aside_and_its_step_saved_again(setup, reference):
    """The newest checkpoint damaged (a rank's file cut by a full disk): the resume sets it aside in RUN/damaged/
    (kept, not deleted), trains its steps again and saves them at the end, and export takes that new checkpoint."""
    from cllama_dist.export.run import pick_checkpoint
    from cllama_dist.trainer import checkpoint

    cfg, out = configure(setup, "damaged_newest")
    shutil.copytree(reference[0] / "checkpoints", out / "checkpoints")
    shutil.copy(reference[0] / "metrics.jsonl", out / "metrics.jsonl")
    newest = out / "checkpoints" / f"step-{STEPS:08d}"
    victim = sorted(newest.rglob("*optim_states.pt"))[0]
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    proc = launch.run(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    aside = out / "damaged" / newest.name
    assert f"skipping checkpoint {newest}: " in proc.stdout and f"{newest.name} -> {aside}" in proc.stdout
    assert f"step-{STEPS - 2:08d} at step {STEPS - 2}" in proc.stdout
    assert (aside / victim.relative_to(newest)).stat().st_size < (reference[0] / victim.relative_to(out)).stat().st_size
    assert launch.losses(out) == reference[1]
    picked = pick_checkpoint(out, None)
    assert picked == newest and checkpoint.problem(picked) is None
    assert checkpoint.read_state(picked)["reason"] == "end"


def test_resuming_onto_other_shards_of_the_same_tokenizer_is_refused_naming_them(setup, reference, tmp_path):
    """The same tokenizer's other shards would be read from the checkpoint's sample offset: other data."""
    from cllama_dist.assets import corpus_path
    from cllama_dist.data.config import PreprocessConfig
    from cllama_dist.data.preprocess import preprocess

    _, tokenizer, shards, _ = setup
    other = tmp_path / "other_shards"
    preprocess(PreprocessConfig(inputs=[str(corpus_path())], tokenizer=str(tokenizer), output=str(other),
                                block_size=64, validation_fraction=0.2, workers=1))
    cfg, out = configure(setup, "other_shards", **{"data.path": str(other)})
    shutil.copytree(reference[0] / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000004")
    proc = launch.single(cfg)
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "it was trained on the shards of", str(shards), f"this run's shards in {other}")


def test_one_rank_failing_alone_stops_every_rank_at_once_under_plain_srun(setup, tmp_path):
    """Rank 1 cannot read the tokenizer (a path relative to its own working directory): both ranks exit 2 with
    the same message within seconds, with no launcher to kill them (a plain srun-style start)."""
    model, tok, shards, root = setup
    here = tmp_path / "rank0"
    here.mkdir()
    (here / "tok").symlink_to(tok)  # only rank 0's working directory has it
    elsewhere = tmp_path / "rank1"
    elsewhere.mkdir()
    cfg, out = configure(setup, "rank_fails", **{"model.tokenizer": "tok"})
    env = {**launch.env(), "SLURM_NTASKS": "2", "SLURM_JOB_ID": str(launch.free_port()),
           "SLURM_JOB_NODELIST": "127.0.0.1"}
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, str(launch.TRAIN), "--config", str(cfg)], cwd=str(cwd),
                              env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, cwd in enumerate((here, elsewhere))]
    outputs = [p.communicate(timeout=300) for p in procs]
    elapsed = time.time() - t0
    assert [p.returncode for p in procs] == [2, 2], outputs
    for _, err in outputs:
        _one_line_error(err, "tokenizer not found: tok", "(rank 1 of 2)")
    assert elapsed < 120, f"the ranks took {elapsed:.0f} s to stop"


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "srun"])
def test_ctrl_c_saves_then_stops_under_every_launcher(setup, reference, launcher):
    cfg, out = configure(setup, f"sigint_{launcher}", **{"checkpoint.save_every": 0})
    if launcher == "srun":
        env = {**launch.env(), "SLURM_NTASKS": "2", "SLURM_JOB_ID": str(launch.free_port()),
               "SLURM_JOB_NODELIST": "127.0.0.1"}
        procs = [subprocess.Popen([sys.executable, str(launch.TRAIN), "--config", str(cfg)],
                                  env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
                 for r in range(2)]
        launch.wait_for_step(out, 3, procs[0])
        for p in procs:  # Ctrl-C in srun's terminal: srun forwards SIGINT to every task
            os.kill(p.pid, signal.SIGINT)
        codes = [p.wait(timeout=300) for p in procs]
        assert codes == [3, 3]
    else:
        proc = launch.start(cfg, launcher=launcher, log=out.with_suffix(".log"))
        launch.wait_for_step(out, 3, proc)
        # Ctrl-C: SIGINT to the terminal's foreground process group, the launcher's (torchrun's workers are in
        # sessions of their own: torchrun forwards it; the deepspeed launcher's share its group).
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=300) != 0
    saved = [json.loads((p / "trainer_state.json").read_text()) for p in sorted((out / "checkpoints").glob("step-*"))
             if (p / "trainer_state.json").is_file()]
    assert saved and saved[-1]["reason"] == "signal", saved
    stopped = saved[-1]["step"]
    assert 3 <= stopped < STEPS
    got = launch.losses(out)
    assert all(got[s] == reference[1][s] for s in got)  # the same run up to the stop


def test_a_full_disk_during_a_checkpoint_fails_in_one_line_and_keeps_the_last_good_one(setup, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (no CAP_SYS_ADMIN?)")
    try:
        cfg, out = configure(setup, "disk_full", **{"checkpoint.save_every": 1, "logging.tensorboard": False})
        run_dir = mnt / "run"
        text = Path(cfg).read_text().replace(str(out), str(run_dir))
        Path(cfg).write_text(text)
        proc = launch.run(cfg, timeout=300)
        assert proc.returncode != 0
        workers_err = proc.stderr + proc.stdout
        import re

        assert re.search(r"cannot (save|write) the checkpoint .*disk full", workers_err), workers_err[-3000:]
        assert "Traceback" not in "\n".join(l for l in workers_err.splitlines() if "cllama train: error" in l)
        ckpts = sorted((run_dir / "checkpoints").iterdir())
        assert not [p for p in ckpts if p.name.endswith(".tmp")], ckpts  # the partial save is gone
        from cllama_dist.trainer import checkpoint

        good = checkpoint.complete(run_dir)
        assert good and all(checkpoint.problem(p) is None for p in good)  # what was saved is whole
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_changing_the_schedule_of_a_run_is_refused_unless_asked_for_and_then_recorded(setup, reference):
    cfg, out = configure(setup, "longer", **{"optim.max_steps": STEPS + 4})
    shutil.copytree(reference[0] / "checkpoints" / f"step-{STEPS:08d}", out / "checkpoints" / f"step-{STEPS:08d}")
    shutil.copy(reference[0] / "config.yaml", out / "config.yaml")
    proc = launch.in_process(cfg)
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "the schedule would change (max_steps 10 -> 14", "allow_schedule_change")
    cfg, _ = configure(setup, "longer", **{"optim.max_steps": STEPS + 4, "checkpoint.allow_schedule_change": True})
    proc = launch.run(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [r for r in launch.metrics(out) if r.get("type") == "note"]
    assert notes and notes[0]["schedule_change"]["max_steps"] == {"was": 10, "now": 14}
    assert (out / f"config-step-{STEPS}.yaml").is_file()
    assert (out / "config.yaml").read_text() == (reference[0] / "config.yaml").read_text()  # history kept


def test_a_fresh_start_sets_an_earlier_attempts_metrics_aside(same_curve):
    # A run of runs.SAME_CURVE: its folder held an earlier attempt's metrics (runs.EARLIER_ATTEMPT), no checkpoint.
    out, _, proc = same_curve("no_ckpt")
    assert [r["step"] for r in launch.metrics(out, "train")] == list(range(1, STEPS + 1))
    aside = list((out / "previous").glob("*/metrics.jsonl"))
    assert len(aside) == 1 and "9.0" in aside[0].read_text() and "moved to" in proc.stdout


def test_exports_never_write_into_their_inputs(setup, reference, tiny_base, tmp_path):
    from cllama_dist.errors import UserError
    from cllama_dist.export.run import export_adapter, export_merged

    model, tok, *_ = setup
    before = {p.name: p.read_bytes() for p in Path(model).iterdir() if p.is_file()}
    adapter = tmp_path / "adapter"
    export_adapter(reference[0], adapter)
    with pytest.raises(UserError, match="output .* is the base model"):
        export_merged(model, adapter, model)
    with pytest.raises(UserError, match="output .* lies inside the base model"):
        export_merged(model, adapter, Path(model) / "merged")
    with pytest.raises(UserError, match="output .* is the run"):
        export_adapter(reference[0], reference[0], overwrite=True)
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        export_adapter(reference[0], adapter)
    export_adapter(reference[0], adapter, overwrite=True)  # ours, of the same kind: replaced
    with pytest.raises(UserError, match="output .* is the adapter"):
        export_merged(model, adapter, adapter, overwrite=True)
    other_kind = tmp_path / "adapter2"
    export_adapter(reference[0], other_kind)
    with pytest.raises(UserError, match=r"holds cllama-dist output of another kind \(adapter\)"):
        export_merged(model, adapter, other_kind, overwrite=True)
    assert {p.name: p.read_bytes() for p in Path(model).iterdir() if p.is_file()} == before
    # A live export holds the lock: a second one is refused, naming it.
    out = tmp_path / "merged"
    with Lock(out.parent / f".{out.name}{LOCK}", "merged-model export"):
        with pytest.raises(UserError, match=f"being written by another merged-model export: pid {os.getpid()}"):
            export_merged(model, adapter, out)
    m = export_merged(model, adapter, out)
    assert m["dtype"] == "fp32"  # the base's dtype, not bf16
    # An adapter folder that lost its weights, a base whose weights are truncated: one line each.
    broken = tmp_path / "broken_adapter"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="has no weights file adapter_model.safetensors"):
        export_merged(model, broken, tmp_path / "m2")
    cut = tmp_path / "cut_base"
    shutil.copytree(model, cut)
    w = cut / "model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(w.stat().st_size // 2)
    with pytest.raises(UserError, match="truncated or damaged"):
        export_merged(cut, adapter, tmp_path / "m3")
    from cllama_dist.eval.config import EvalConfig
    from cllama_dist.eval.run import evaluate

    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "人工智能"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="cannot load the model .*truncated or damaged"):
        evaluate(EvalConfig(model=str(cut), tokenizer=str(tiny_base), inputs=[str(text)]))
    with pytest.raises(UserError, match="eval JSON output .* lies inside the model"):
        evaluate(EvalConfig(model=str(model), tokenizer=str(tiny_base), inputs=[str(text)],
                            json_out=str(Path(model) / "eval.json")))


def test_merging_a_tokenizer_into_the_model_folder_is_refused(setup, tiny_base, tiny_zh_model, tmp_path):
    from cllama_dist.errors import UserError
    from cllama_dist.tokenizer.config import MergeConfig
    from cllama_dist.tokenizer.merge import merge

    model = tmp_path / "model"
    shutil.copytree(setup[0], model)
    shutil.copy(tiny_base / "tokenizer.model", model / "tokenizer.model")
    before = sorted(p.name for p in model.iterdir())
    with pytest.raises(UserError, match="output .* contains the base tokenizer"):
        merge(MergeConfig(base=str(model / "tokenizer.model"), add=str(tiny_zh_model), out=str(model), overwrite=True))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    with pytest.raises(UserError, match="did not create as a tokenizer .* never replaced"):
        merge(MergeConfig(base=str(tiny_base), add=str(tiny_zh_model), out=str(foreign), overwrite=True))
    assert sorted(p.name for p in model.iterdir()) == before and (foreign / "a.txt").exists()
    out = tmp_path / "merged"
    merge(MergeConfig(base=str(tiny_base), add=str(tiny_zh_model), out=str(out)))
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # readable by others on a shared cluster
    merge(MergeConfig(base=str(tiny_base), add=str(tiny_zh_model), out=str(out), overwrite=True))


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
