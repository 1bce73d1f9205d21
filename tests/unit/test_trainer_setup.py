"""The trainer's set-up as data (trainer/setup.py, state.py, checkpoint.py, stages.py), without processes: the
plain run as one stage, the run identity, damaged checkpoints set aside, the trainer's imports."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cllama_dist
from cllama_dist.config import build
from cllama_dist.data.config import DataSetConfig
from cllama_dist.errors import UserError
from cllama_dist.trainer import checkpoint, engine as engines
from cllama_dist.trainer.checkpoint import Checkpointer
from cllama_dist.trainer.config import CheckpointConfig, TrainConfig
from cllama_dist.trainer.mixture import ShardSet, content_identity
from cllama_dist.trainer.plan import lr_factor
from cllama_dist.trainer.stages import Schedule
from cllama_dist.trainer.state import RunIdentity, TrainerState


def test_a_plain_run_is_one_stage_with_the_curve_and_records_it_always_had():
    cfg = build(TrainConfig, {"model.config": {"vocab_size": 10},
                              "optim": {"lr": 3e-3, "embedding_lr": 1e-2, "warmup_steps": 2, "min_lr_ratio": 0.1}})
    sched = Schedule(cfg.stages, cfg.optim, max_steps=10)
    model = torch.nn.Linear(2, 2)
    groups = engines.param_groups(SimpleNamespace(named_parameters=lambda: [
        ("lora_A", model.weight), ("embed_tokens.weight_new", model.bias)]), cfg.optim)
    engine = SimpleNamespace(optimizer=torch.optim.AdamW(groups, lr=1.0))
    for step in range(11):
        record = sched.enter(engine, step)
        factor = lr_factor(step, cfg.optim, 10)
        # bit for bit what engine.set_lr(engine, lr_factor(...)) gave each group
        assert [g["lr"] for g in engine.optimizer.param_groups] == [g["peak_lr"] * factor for g in groups]
        assert record == {"lr": cfg.optim.lr * factor}
    assert sched.max_steps == 10 and not sched.staged and not sched.freezes
    assert sched.describe() == [] and sched.at(3).name == "" and sched.record()["stages"] == []
    assert sched.record() == {"max_steps": 10, "lr": 3e-3, "embedding_lr": 1e-2, "warmup_steps": 2,
                              "min_lr_ratio": 0.1, "stages": []}


def identity(**over) -> RunIdentity:
    base = RunIdentity(global_batch=8, tokenizer={"sha256": "ab"}, embeddings="new-rows", block_size=64,
                       zero_stage=3, base_model={"source": "/m", "sha256": "1"}, mixture=[], document_mask=False,
                       shards=[{"path": "/data/shards", "sha256": "d" * 64}],
                       schedule={"max_steps": 10, "lr": 1e-3, "stages": []})
    return replace(base, **over)


def test_one_identity_fills_the_saved_state_and_is_checked_against_it(tmp_path):
    mine = identity()
    state = TrainerState(step=4, world_size=2, samples_consumed=32, orig_vocab=10, new_vocab=12, reason="end",
                         **mine.record())
    saved = json.loads(json.dumps(state.__dict__))
    assert saved["tokenizer_sha256"] == "ab" and saved["shards"] == mine.shards and saved["schedule"] == mine.schedule
    mine.check(tmp_path, saved)
    # Another world size (a universal resume) and the same shards moved to another folder: the same run.
    moved = identity(shards=[{"path": "/elsewhere", "sha256": "d" * 64}])
    moved.check(tmp_path, {**saved, "world_size": 1})
    # Other shards made by the same tokenizer: one line naming the folder.
    other = identity(shards=[{"path": "/data/other", "sha256": "e" * 64}])
    with pytest.raises(UserError, match=r"^cannot resume .*: it was trained on the shards of /data/shards "
                                        r"\(train shards digest dddddddddddd\), this run's shards in /data/other "
                                        r"differ \(digest eeeeeeeeeeee\)") as info:
        other.check(tmp_path, saved)
    assert "\n" not in str(info.value)
    other.check(tmp_path, {k: v for k, v in saved.items() if k != "shards"})  # an older checkpoint: not compared
    with pytest.raises(UserError, match="its embeddings is 'new-rows', this run's is 'full'"):
        identity(embeddings="full").check(tmp_path, saved)


def test_a_schedule_change_is_refused_unless_allowed_and_a_plain_checkpoint_is_not_a_staged_one(tmp_path):
    staged = identity(schedule={"max_steps": 10, "lr": 1e-3, "stages": [{"name": "emb"}]})
    plain = {"schedule": {"max_steps": 10, "lr": 1e-3, "stages": []}}
    with pytest.raises(UserError, match=r"the schedule would change \(stages \[\] -> \[\{'name': 'emb'\}\]\)"):
        staged.schedule_change(tmp_path, plain, allowed=False)
    assert identity().schedule_change(tmp_path, {"schedule": {"max_steps": 10, "lr": 1e-3}}, False) == {}
    assert identity(schedule={"max_steps": 14, "lr": 1e-3, "stages": []}).schedule_change(
        tmp_path, plain, allowed=True) == {"max_steps": {"was": 10, "now": 14}}


def test_shard_content_identity_is_the_train_shards_not_the_folder(tmp_path):
    def shard_set(path: str, sha: str) -> ShardSet:
        manifest = {"splits": {"train": {"shards": [{"file": "train-00000.arrow", "sha256": sha}]},
                               "validation": {"shards": [{"file": "validation-00000.arrow", "sha256": "v"}]}}}
        return ShardSet(DataSetConfig(name="s", path=path), manifest)

    a, moved, other = (content_identity([shard_set(p, s)]) for p, s in (("/a", "1"), ("/b", "1"), ("/a", "2")))
    assert a[0]["path"] == "/a" and a[0]["sha256"] == moved[0]["sha256"] != other[0]["sha256"]


def _checkpoint(run: Path, step: int, damaged: bool = False) -> Path:
    d = checkpoint.root(run) / checkpoint.step_name(step)
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"a" * 100)
    (d / checkpoint.STATE).write_text(json.dumps({"step": step}))
    checkpoint.write_file_list(d)
    if damaged:
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"a" * 10)  # a full disk
    return d


def test_a_damaged_newest_checkpoint_is_set_aside_saved_again_and_never_exported(tmp_path):
    """Fault 8: the resume skips a damaged newest checkpoint; it is moved to RUN/damaged/ (never deleted), so
    the end of the run saves its step again and export takes the good one, never the damaged one."""
    good, bad = _checkpoint(tmp_path, 8), _checkpoint(tmp_path, 10, damaged=True)
    c = Checkpointer(tmp_path, CheckpointConfig(resume="auto", save_every=2))
    assert c.find_resume() == good
    assert c.notes == [f"note: skipping checkpoint {bad}: zero_pp_rank_0_mp_rank_00_optim_states.pt has 10 bytes, "
                       "100 were written (truncated?)"]
    notes = c.set_aside()
    aside = tmp_path / "damaged" / "step-00000010"
    assert notes == [f"note: damaged checkpoints set aside (their steps are trained and saved again): "
                     f"step-00000010 -> {aside}"]
    assert not bad.exists() and (aside / "zero_pp_rank_0_mp_rank_00_optim_states.pt").stat().st_size == 10
    assert checkpoint.complete(tmp_path) == [good]
    # When to save: the steps of save_every but the last (the end's), and the end unless this run saved it.
    assert [s for s in range(1, 11) if c.due(s, 10)] == [2, 4, 6, 8]
    assert c.needs_final(10)
    c.last_saved = 10
    assert not c.needs_final(10)
    # Export lists the run's checkpoints: the damaged one is not among them, and asking for it says where it is.
    assert checkpoint.pick(tmp_path, None) == (good, [])
    with pytest.raises(UserError, match=r"no complete checkpoint at step 10; it has step-00000008 \(step-00000010 "
                                        r"set aside in .*damaged as damaged\)"):
        checkpoint.pick(tmp_path, 10)
    # The same step damaged again: both kept.
    again = _checkpoint(tmp_path, 10, damaged=True)
    c = Checkpointer(tmp_path, CheckpointConfig(resume="auto"))
    c.find_resume()
    c.set_aside()
    assert not again.exists() and (tmp_path / "damaged" / "step-00000010.1").is_dir() and aside.is_dir()


def test_export_skips_a_damaged_checkpoint_that_is_still_in_place(tmp_path):
    good, bad = _checkpoint(tmp_path, 8), _checkpoint(tmp_path, 10, damaged=True)
    path, notes = checkpoint.pick(tmp_path, None)
    assert path == good and notes == [f"note: skipping checkpoint {bad}: zero_pp_rank_0_mp_rank_00_optim_states.pt "
                                      "has 10 bytes, 100 were written (truncated?)"]
    with pytest.raises(UserError, match="cannot export .*step-00000010: .*truncated"):
        checkpoint.pick(tmp_path, 10)


def _imports(root: Path) -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, at any depth of its code (imports
    inside functions count: they run when called)."""
    modules = {}
    for p in root.rglob("*.py"):
        rel = p.relative_to(root.parent).with_suffix("")
        modules[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    graph = {}
    for name, p in modules.items():
        here = name.split(".") if p.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_no_trainer_module_imports_itself_back():
    graph = _imports(Path(cllama_dist.__file__).parent)

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    circles = sorted(m for m in graph if m.startswith("cllama_dist.trainer") and m in reaches(m))
    assert circles == []
