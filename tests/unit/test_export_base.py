"""An adapter is merged into (or loaded onto) the base its run trained on, and no other: the checkpoint's
fingerprint of the base travels into the adapter, and a base of the same shape with other weights is refused
in one line before anything is written."""

import json
import shutil

import pytest
import torch

from cllama_dist import cli
from cllama_dist.chat_config import ChatConfig
from cllama_dist.errors import UserError
from cllama_dist.export import run as export
from cllama_dist.inference.load import load_model
from cllama_dist.model.identity import folder_fingerprint

from .test_export_template import fake_run  # noqa: F401  (the fixture: a run folder export reads without DeepSpeed)


@pytest.fixture
def other_base(tiny_model_dir, tmp_path):
    """The tiny base's architecture and vocabulary with other weights (another seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    out = tmp_path / "other_base"
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).save_pretrained(out)
    return out


def test_a_merge_onto_another_base_is_refused_before_anything_is_written(fake_run, tiny_model_dir, other_base,
                                                                         tmp_path, capsys):
    meta = export.export_adapter(fake_run(None), tmp_path / "adapter")
    ours = folder_fingerprint(tiny_model_dir)
    assert meta["base_fingerprint"] == ours
    assert json.loads((tmp_path / "adapter" / "cllama_export.json").read_text())["base_fingerprint"] == ours
    theirs = folder_fingerprint(other_base)["sha256"]

    with pytest.raises(UserError) as refused:
        export.export_merged(other_base, tmp_path / "adapter", tmp_path / "merged")
    message = str(refused.value)
    assert "\n" not in message
    assert f"the base {other_base} (fingerprint {theirs[:16]}...)" in message
    assert f"trained on: {tiny_model_dir} (fingerprint {ours['sha256'][:16]}...)" in message
    assert "pass that model (or an unchanged copy of it) as the base" in message
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))

    # The command: exit 2, the one line on stderr, nothing written.
    capsys.readouterr()
    code = cli.main(["export", "merged", "--base", str(other_base), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(tmp_path / "m2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0] == f"cllama export merged: error: {message}"
    assert not (tmp_path / "m2").exists()

    # Loading the adapter onto it (cllama eval / chat) is refused the same way.
    with pytest.raises(UserError, match="is not the model the adapter .* was trained on"):
        load_model(ChatConfig(model=str(other_base), adapter=str(tmp_path / "adapter"), device="cpu"))


def test_a_copy_of_the_base_merges_and_an_adapter_without_a_fingerprint_is_not_checked(
        fake_run, tiny_model_dir, other_base, tmp_path):
    export.export_adapter(fake_run(None), tmp_path / "adapter")
    copy = tmp_path / "copy_of_base"
    shutil.copytree(tiny_model_dir, copy)
    assert export.export_merged(copy, tmp_path / "adapter", tmp_path / "merged")["vocab_size"] > 0
    # An adapter exported before the fingerprint was recorded: merged as before, on the user's word.
    old = tmp_path / "old_adapter"
    shutil.copytree(tmp_path / "adapter", old)
    meta = json.loads((old / "cllama_export.json").read_text())
    del meta["base_fingerprint"]
    (old / "cllama_export.json").write_text(json.dumps(meta))
    assert export.export_merged(other_base, old, tmp_path / "merged_old")["vocab_size"] > 0


def test_a_damaged_base_is_named_as_damaged_not_as_another_model(fake_run, tiny_model_dir, tmp_path):
    export.export_adapter(fake_run(None), tmp_path / "adapter")
    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    w = cut / "model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(w.stat().st_size // 2)
    with pytest.raises(UserError, match=f"cannot read {w}: .*truncated or damaged"):
        export.export_merged(cut, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
