"""Config input that was silently wrong or noisy: flat keys of earlier versions, a key given twice, ${VAR} in a
path, doubled or empty defaults in --help. Each refusal is one line naming the file or flag, the key and the fix."""

from __future__ import annotations

import re

import pytest

from cllama_dist import cli
from cllama_dist.config import RENAMED, _leaves, load, load_yaml
from cllama_dist.errors import UserError
from cllama_dist.tokenizer.config import MergeConfig
from cllama_dist.trainer.config import TrainConfig

MODEL = "model:\n  config: {vocab_size: 10}\n"


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_every_flat_name_of_earlier_versions_points_at_a_setting_that_exists():
    leaves = {dotted for dotted, *_ in _leaves(TrainConfig)}
    assert len(RENAMED) == 41 and set(RENAMED.values()) <= leaves


@pytest.mark.parametrize("flat,dotted", [("lr", "optim.lr"), ("max_steps", "optim.max_steps"),
                                         ("tokenizer", "model.tokenizer"), ("resume", "checkpoint.resume"),
                                         ("eval_every", "validation.every"), ("lora_rank", "lora.rank")])
def test_a_flat_yaml_key_of_earlier_versions_is_refused_naming_its_key_now(flat, dotted, tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text(f"{MODEL}{flat}: 1\n")
    err = _error(capsys, ["train", "--config", str(f), "--dry-run"])
    section, _, leaf = dotted.partition(".")
    assert err == (f"cllama train: error: {f}: {flat}: unknown setting; use {dotted} (YAML: `{section}: {{{leaf}: "
                   f"...}}`; flag: --{dotted.replace('_', '-')})")


def test_a_plain_value_for_what_is_now_a_section_names_the_setting(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("model: /models/llama-7b\n")
    err = _error(capsys, ["train", "--config", str(f), "--dry-run"])
    assert err.startswith(f"cllama train: error: {f}: model: is a section; ") and "use model.path" in err


@pytest.mark.parametrize("argv,says", [(["--lr", "1e-4"], "--lr: unknown flag; use --optim.lr"),
                                       (["--max_steps", "3"], "--max-steps: unknown flag; use --optim.max-steps"),
                                       (["--data", "shards/"], "--data: unknown flag; use --data.path"),
                                       (["--model", "base/"], "--model: unknown flag; use --model.path"),
                                       (["--no-tensorboard"], "--no-tensorboard: unknown flag; use "
                                                              "--no-logging.tensorboard")])
def test_a_flat_flag_of_earlier_versions_is_refused_naming_its_flag_now(argv, says, tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text(MODEL)
    assert _error(capsys, ["train", "--config", str(f), *argv, "--dry-run"]) == f"cllama train: error: {says}"
    # The same after `cllama submit train ... --`, whose flags the trainer's parser reads.
    assert _error(capsys, ["submit", "train", "--config", str(f), "--", *argv]) == f"cllama submit: error: {says}"


def test_real_flag_synonyms_stay(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(MODEL)
    args = cli.build_parser().parse_args(["train", "--config", str(f), "--ds-config", "x.json", "--out", "r"])
    assert (getattr(args, "engine.deepspeed_config"), args.output_dir) == ("x.json", "r")


@pytest.mark.parametrize("text,key,lines", [
    (f"{MODEL}optim:\n  lr: 1e-4\n  max_steps: 5\n  lr: 2e-4\n", "optim.lr", (4, 6)),
    (f"output_dir: a\n{MODEL}output_dir: b\n", "output_dir", (1, 4)),
    (f"{MODEL}stages:\n  - {{name: a, steps: 1, steps: 2}}\n", "stages[0].steps", (4, 4)),
])
def test_a_yaml_key_given_twice_is_refused_naming_the_file_key_and_both_lines(text, key, lines, tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as err:
        load(TrainConfig, f)
    assert str(err.value) == (f"config file {f}: {key} is given twice (lines {lines[0]} and {lines[1]}); only the "
                              "last would count: keep one")
    f.write_text("base: a\nadd: b\nbase: c\n")  # every stage's config file, and `preprocess finalize`'s read too
    with pytest.raises(UserError, match=r"base is given twice \(lines 1 and 3\)"):
        load_yaml(f)


def test_environment_variables_in_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("CLLAMA_T_ROOT", str(tmp_path))
    monkeypatch.setenv("CLLAMA_T_RUN", "run1")
    f = tmp_path / "run.yaml"
    f.write_text(f"{MODEL}  tokenizer: ${{CLLAMA_T_ROOT}}/tok\noutput_dir: $CLLAMA_T_ROOT/runs/${{CLLAMA_T_RUN}}\n"
                 "data:\n  sets: ['zh=$CLLAMA_T_ROOT/zh:0.9', {name: en, path: '${CLLAMA_T_ROOT}/en'}]\n")
    cfg = load(TrainConfig, f)
    assert (cfg.model.tokenizer, cfg.output_dir) == (f"{tmp_path}/tok", f"{tmp_path}/runs/run1")
    assert [s.path for s in cfg.data.sets] == [f"{tmp_path}/zh", f"{tmp_path}/en"]
    assert MergeConfig(base="$CLLAMA_T_ROOT/b", add="a", out="o").base == f"{tmp_path}/b"
    # Settings that are not paths keep their text.
    assert load(TrainConfig, None, {"model.config": {"vocab_size": 10}, "logging.wandb_project": "$X"}).logging \
        .wandb_project == "$X"


def test_an_unset_variable_in_a_path_is_refused_naming_the_key_and_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CLLAMA_T_UNSET", raising=False)
    monkeypatch.chdir(tmp_path)
    f = tmp_path / "run.yaml"
    f.write_text(f"{MODEL}output_dir: runs/${{CLLAMA_T_UNSET}}\n")
    with pytest.raises(UserError) as err:
        load(TrainConfig, f)
    assert str(err.value) == (f"{f}: output_dir: environment variable CLLAMA_T_UNSET is not set (in "
                              "'runs/${CLLAMA_T_UNSET}')")
    # From a flag, nothing is created under a folder named after the variable.
    err = _error(capsys, ["tokenizer", "merge", "--base", "b.model", "--add", "a.model", "--out", "$CLLAMA_T_UNSET/m"])
    assert err == ("cllama tokenizer merge: error: --out: environment variable CLLAMA_T_UNSET is not set (in "
                   "'$CLLAMA_T_UNSET/m')")
    assert list(tmp_path.iterdir()) == [f]


def _option_helps(text: str) -> list[str]:
    """Each option's help, its wrapped lines joined."""
    return [" ".join(block.split()) for block in re.split(r"\n(?=  -)", text) if block.lstrip().startswith("-")]


@pytest.mark.parametrize("words", [c.words for c in cli.COMMANDS], ids=[" ".join(c.words) for c in cli.COMMANDS])
def test_help_states_each_default_once_and_never_an_empty_one(words, capsys):
    with pytest.raises(SystemExit):
        cli.main([*words, "--help"])
    helps = _option_helps(capsys.readouterr().out)
    assert len(helps) > 3
    for h in helps:
        assert len(re.findall(r"\(default", h, re.IGNORECASE)) <= 1, h
        assert not re.search(r"\(default: (''|\[\]|\{\}|None)\)", h), h
    if words == ("train",):
        out = next(h for h in helps if h.startswith("--output-dir"))
        assert out.endswith("(default runs/train).")
        assert any(h.startswith("--optim.lr") and h.endswith("(default: 0.0002)") for h in helps)
