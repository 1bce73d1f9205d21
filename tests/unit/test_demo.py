import pytest

from cllama_dist.errors import UserError
from cllama_dist.recipes import demo
from cllama_dist.recipes.demo.config import STAGE_NAMES as STAGES
from cllama_dist.recipes.demo.config import DemoConfig
from cllama_dist.recipes.demo.recipe import recipe
from cllama_dist.recipes.runner import StageRunner as Stages


def run_demo(**kw):
    return demo.run(DemoConfig(**kw))



def test_demo_refuses_unknown_stage_and_bad_steps(tmp_path):
    with pytest.raises(UserError, match="until: 'training': not a stage; the stages are corpus, base"):
        run_demo(out=str(tmp_path), until="training")
    with pytest.raises(UserError, match="steps: must be at least 1"):
        run_demo(out=str(tmp_path), steps=0)


def test_the_recipe_lists_the_stages_in_order():
    assert [s.name for s in recipe(DemoConfig())] == list(STAGES)


def test_a_resumable_stage_keeps_unfinished_work_unless_its_inputs_changed(tmp_path, capsys):
    calls = []

    def work(folder):
        calls.append(sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")))
        (folder / f"part{len(calls)}").write_text("x")
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed half-way
        return {"parts": len(calls)}

    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path, False, 1).run("train", {"k": 1}, work, resumable=True)
    assert Stages(tmp_path, False, 1).run("train", {"k": 1}, work, resumable=True)["parts"] == 2
    assert calls[1] == ["part1"]  # the second attempt found the first one's work
    assert "resuming the unfinished stage" in capsys.readouterr().out
    # Finished: reused as is. New inputs: started afresh. --force: started afresh.
    assert Stages(tmp_path, False, 1).run("train", {"k": 1}, work, resumable=True)["parts"] == 2
    assert Stages(tmp_path, False, 1).run("train", {"k": 2}, work, resumable=True)["parts"] == 3
    assert calls[2] == []
    assert Stages(tmp_path, True, 1).run("train", {"k": 2}, work, resumable=True)["parts"] == 4
    assert calls[3] == []


def test_the_printed_training_command_is_one_cllama_parses_as_the_demo_runs_it(tmp_path, monkeypatch):
    """What the demo prints before training is pasteable: `cllama train` with an absolute config path (so it works
    from any folder), two processes, DeepSpeed's launcher; its workers get exactly --config."""
    from cllama_dist import cli
    from cllama_dist.recipes.demo.recipe import DEMO_PROCS, train_command

    monkeypatch.chdir(tmp_path)
    cmd = train_command("runs/demo/train/run.yaml", DEMO_PROCS)
    assert cmd[:2] == ["cllama", "train"]
    argv = cli.normalise_flags(cmd[1:])
    args = cli.build_parser().parse_args(argv)
    assert (args.nproc_per_node, args.launcher) == (2, "deepspeed")
    assert args.config == str(tmp_path / "runs/demo/train/run.yaml")
    assert cli._without_launch_flags(argv[1:]) == ["--config", args.config]


def test_replay_adds_its_stages_and_a_mixture_config(tmp_path):
    from cllama_dist.config import build
    from cllama_dist.recipes.demo.config import REPLAY_STAGE_NAMES
    from cllama_dist.recipes.demo.recipe import replay_config
    from cllama_dist.trainer.config import TrainConfig

    names = [s.name for s in recipe(DemoConfig(replay=0.1))]
    assert names == list(STAGES[:9]) + list(REPLAY_STAGE_NAMES) + list(STAGES[9:])  # before eval, which compares
    r = {"model": {"folder": "m"}, "merge": {"tokenizer": "t"}, "shards": {"folder": "zh"},
         "replay_shards": {"folder": "en"}}
    cfg = build(TrainConfig, {**replay_config(r, 10, 0.1), "output_dir": str(tmp_path)})
    assert [(s.name, s.path, s.weight) for s in cfg.data.sets] == [("zh", "zh", 0.9), ("en", "en", 0.1)]
    assert cfg.data.path == "" and cfg.data.global_batch_size == 16
    with pytest.raises(UserError, match=r"replay: must be within \[0, 1\)"):
        DemoConfig(replay=1.0)
    with pytest.raises(UserError, match="not a stage"):
        DemoConfig(until="train_replay")  # only with --replay
    assert DemoConfig(until="train_replay", replay=0.1).until == "train_replay"
