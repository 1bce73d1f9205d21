"""Every config the project ships builds through the typed loader, and resolves to what it says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cllama_dist import PROJECT_ROOT
from cllama_dist.config import build, load
from cllama_dist.errors import UserError
from cllama_dist.trainer.config import TrainConfig
from cllama_dist.trainer.engine import resolve, zero_stage
from cllama_dist.trainer.plan import Plan

CONFIGS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((PROJECT_ROOT / "deepspeed_configs").glob("*.json"))


GPU_CONFIGS = [p for p in CONFIGS if not p.name.startswith("tiny-cpu")]


def test_there_are_shipped_configs():
    assert {p.name for p in CONFIGS} >= {"tiny-cpu.yaml", "tinyllama-1b.yaml", "llama-7b.yaml", "llama-13b.yaml",
                                         "llama-7b-two-stage.yaml", "tiny-cpu-two-stage.yaml"}
    assert {p.name for p in DS_CONFIGS} >= {"zero3.json", "zero2.json", "zero3_offload.json", "zero3_multinode.json"}


def opening_command(path: Path) -> list[str]:
    """The first command in the config's opening comment that runs it (`cllama train ...`), continuations joined."""
    import shlex

    lines = [line[1:].strip() for line in path.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("cllama train"))
    text = ""
    for line in lines[start:]:
        text += line.rstrip("\\") + " "
        if not line.endswith("\\"):
            break
    return shlex.split(text.split("#")[0])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_run_configs_open_with_the_command_that_runs_them(path: Path):
    from cllama_dist import cli

    assert path.read_text().startswith("#")
    cmd = opening_command(path)
    args = cli.build_parser().parse_args(cli.normalise_flags(cmd[1:]))
    assert args.config == "configs/" + path.name and args.nproc_per_node >= 1
    load(TrainConfig, path)  # builds and validates


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.name for p in GPU_CONFIGS])
def test_gpu_run_configs_are_the_papers_setup(path: Path):
    cfg = load(TrainConfig, path)
    assert cfg.model.config["vocab_size"] == 32000 and cfg.model.extended_vocab == 49953
    assert cfg.engine.dtype == "bf16" and cfg.model.gradient_checkpointing
    assert cfg.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if path.name.startswith("llama-"):  # the paper's pre-training recipe
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.data.block_size, cfg.data.global_batch_size) == (8, 32.0, 512, 1024)
        assert cfg.optim.lr == 2e-4


def test_the_tiny_cpu_config_is_the_demos_training_on_its_artefacts():
    """configs/tiny-cpu.yaml trains on what `cllama demo --until model` leaves in runs/demo, as the demo itself does
    (tests/integration/test_cli_processes.py runs it for two steps)."""
    from cllama_dist.recipes.demo.recipe import run_config

    cfg = load(TrainConfig, PROJECT_ROOT / "configs" / "tiny-cpu.yaml")
    demo = build(TrainConfig, {**run_config({"model": {"folder": "runs/demo/model/hf"},
                                             "merge": {"tokenizer": "runs/demo/merge/tokenizer"},
                                             "shards": {"folder": "runs/demo/shards/shards"}}, 60),
                               "output_dir": "runs/tiny-cpu"})
    assert (cfg.model.path, cfg.model.tokenizer, cfg.data.path) == (demo.model.path, demo.model.tokenizer,
                                                                    demo.data.path)
    assert (cfg.lora, cfg.optim, cfg.checkpoint, cfg.validation) == (demo.lora, demo.optim, demo.checkpoint,
                                                                     demo.validation)
    assert cfg.engine.dtype == "auto" and cfg.data.block_size == 0  # fp32 on a CPU; the shards' block size
    assert cfg.engine.deepspeed_overrides == demo.engine.deepspeed_overrides


@pytest.mark.parametrize("path", DS_CONFIGS, ids=[p.name for p in DS_CONFIGS])
def test_deepspeed_configs_resolve(path: Path):
    cfg = build(TrainConfig, {"model.config": {"vocab_size": 10}, "engine.deepspeed_config": str(path),
                              "optim.clip_grad": 0.5})
    plan = Plan(world=2, micro=4, accum=2, block=512, max_steps=10, train_sequences=1000)
    ds = resolve(cfg, plan, "bf16", universal=False)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (4, 2, 16, 0.5)
    assert ds["bf16"]["enabled"] and zero_stage(ds) == (2 if "zero2" in path.name else 3)
    raw = json.loads(path.read_text())
    assert all(raw[k] == "auto" for k in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_clipping"))


def test_the_demo_run_config_builds():
    from cllama_dist.recipes.demo.recipe import run_config

    r = {"model": {"folder": "/m"}, "merge": {"tokenizer": "/t"}, "shards": {"folder": "/s"}}
    cfg = build(TrainConfig, {**run_config(r, 60), "output_dir": "/run"})
    assert (cfg.model.path, cfg.model.tokenizer, cfg.data.path) == ("/m", "/t", "/s")
    assert (cfg.optim.max_steps, cfg.checkpoint.save_every, cfg.validation.every) == (60, 15, 15)
    assert cfg.engine.deepspeed_overrides["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_the_flat_keys_of_earlier_versions_are_refused_naming_their_nested_key():
    """The flat layout (``lr:``, ``model: /base``) is no longer read; the message says what replaced it."""
    with pytest.raises(UserError, match=r"^lr: unknown setting; use optim\.lr \(YAML: `optim: \{lr: \.\.\.\}`; "
                                        r"flag: --optim\.lr\)$"):
        build(TrainConfig, {"model": {"path": "/base"}, "lr": 1e-4})
    with pytest.raises(UserError, match=r"^model: is a section; for the setting a plain `model:` value gave, use "
                                        r"model\.path \(YAML: `model: \{path: \.\.\.\}`; flag: --model\.path\)$"):
        build(TrainConfig, {"model": "/base"})


@pytest.mark.parametrize("name", ["llama-7b-two-stage.yaml", "tiny-cpu-two-stage.yaml"])
def test_the_two_stage_configs_are_the_papers_two_stages(name):
    """Stage 1 the embedding rows alone, stage 2 LoRA + the rows; otherwise the one-stage config's settings."""
    from cllama_dist.trainer.stages import Schedule

    cfg = load(TrainConfig, PROJECT_ROOT / "configs" / name)
    one = load(TrainConfig, PROJECT_ROOT / "configs" / name.replace("-two-stage", ""))
    assert [s.trainable for s in cfg.stages] == ["embeddings", "lora+embeddings"]
    assert (cfg.model, cfg.lora, cfg.data, cfg.engine) == (one.model, one.lora, one.data, one.engine)
    first, second = Schedule(cfg.stages, cfg.optim).stages
    assert dict(first.peak)["lora"] == 0 and all(v > 0 for _, v in second.peak) and second.start == first.steps
