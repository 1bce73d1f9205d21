"""Export carries the chat template a run trained through: stock apply_chat_template then gives the training ids.

The run is hand-made (a trainer_state.json config and trained tensors, no DeepSpeed): what is tested is what
export does with them. tests/integration/test_train.py exports a real ZeRO-3 run.
"""

import json
import shutil

import pytest
import sentencepiece as spm
import torch

from cllama_dist import cli
from cllama_dist.config import to_dict
from cllama_dist.errors import UserError
from cllama_dist.export import run as export
from cllama_dist.model.identity import base_fingerprint
from cllama_dist.sft import templates
from cllama_dist.sft.encode import encode_prompt
from cllama_dist.tokenizer import spm as spmio
from cllama_dist.trainer.config import TrainConfig

from ..conftest import TINY_LLAMA

CONVERSATIONS = [
    [{"role": "user", "content": "把这句话倒过来：我爱北京。"}],
    [{"role": "system", "content": "只用中文回答。"}, {"role": "user", "content": "你好 world"}],
    [{"role": "user", "content": "复制这句话：学校博物馆干净。\n输入：无"}],
]
MULTI = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
         {"role": "user", "content": "把这句话倒过来：我爱北京。"}]


def manifest(folder, template):
    folder.mkdir(parents=True, exist_ok=True)
    entry = None if template is None else {"name": template.name, "sha256": template.sha256, "source": template.source}
    (folder / "manifest.json").write_text(json.dumps({"format": "sft", "template": entry}))
    return folder


@pytest.fixture
def fake_run(tmp_path, tiny_model_dir, tiny_merged, monkeypatch):
    """make(template, tokenizer=tiny_merged) -> run folder whose checkpoint export reads without DeepSpeed."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    new = sp.get_piece_size()
    orig = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    hidden, kv = TINY_LLAMA["hidden_size"], TINY_LLAMA["num_key_value_heads"] * 16
    g = torch.Generator().manual_seed(0)
    tensors = {"base_model.model.model.embed_tokens.weight_new": torch.randn(new - orig, hidden, generator=g),
               "base_model.model.lm_head.weight_new": torch.randn(new - orig, hidden, generator=g)}
    for layer in range(TINY_LLAMA["num_hidden_layers"]):
        for proj, out in (("q_proj", hidden), ("v_proj", kv)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.default.weight"] = 0.1 * torch.randn(4, hidden, generator=g)
            tensors[f"{key}.lora_B.default.weight"] = 0.1 * torch.randn(out, 4, generator=g)
    states = {}

    def make(template, tokenizer=tiny_merged, name="run", state_template=None):
        run = tmp_path / "runs" / name
        data = tmp_path / "runs" / f"{name}_data"
        if template != "no manifest":
            manifest(data, template)
        cfg = TrainConfig(output_dir=str(run), model={"path": str(tiny_model_dir), "tokenizer": str(tokenizer)},
                          lora={"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"]}, data={"path": str(data)})
        state = {"step": 5, "config": to_dict(cfg), "orig_vocab": orig, "new_vocab": new, "embeddings": "new-rows",
                 "tokenizer_sha256": spmio.fingerprint(tokenizer / "tokenizer.model")["sha256"]}
        if state_template is not None:
            state["template"] = state_template
        state["base_model"] = base_fingerprint(cfg.model, cfg.seed)  # as the trainer records it
        ckpt = run / "checkpoints" / "step-00000005"
        ckpt.mkdir(parents=True)
        states[str(ckpt)] = state
        return run

    monkeypatch.setattr(export, "pick_checkpoint", lambda run, step: export.Path(run) / "checkpoints" / "step-00000005")
    monkeypatch.setattr(export.checkpoint, "read_state", lambda ckpt: states[str(ckpt)])
    monkeypatch.setattr(export, "trained_tensors", lambda ckpt: dict(tensors))
    return make


@pytest.mark.parametrize("name", ["alpaca", "llama2"])
def test_exported_template_makes_stock_apply_chat_template_give_the_training_ids(name, fake_run, tiny_model_dir,
                                                                                tiny_merged, tmp_path):
    from transformers import AutoTokenizer

    template = templates.builtin(name)
    before = (tiny_merged / "tokenizer_config.json").read_text()
    run = fake_run(template)
    meta = export.export_adapter(run, tmp_path / "adapter")
    assert meta["chat_template"]["name"] == name and meta["chat_template"]["sha256"] == template.sha256
    assert json.loads((tmp_path / "adapter" / "cllama_export.json").read_text())["chat_template"] == meta["chat_template"]
    cfg = json.loads((tmp_path / "adapter" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == template.source
    assert (tiny_merged / "tokenizer_config.json").read_text() == before  # the input tokenizer is untouched
    assert "apply_chat_template" in (tmp_path / "adapter" / "README.md").read_text()

    merged = export.export_merged(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
    record = json.loads((tmp_path / "merged" / "cllama_export.json").read_text())
    assert merged["chat_template"]["name"] == record["chat_template"]["name"] == name
    assert record["chat_template"]["sha256"] == template.sha256 and record["kind"] == "merged"

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "merged" / "tokenizer.model"))
    for folder in (tmp_path / "adapter", tmp_path / "merged"):
        tok = AutoTokenizer.from_pretrained(folder)
        for conv in CONVERSATIONS + ([MULTI] if name == "llama2" else []):
            stock = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert list(stock) == encode_prompt(conv, template, sp), (name, conv)


def test_fast_layout_tokenizer_gives_the_same_prompt_ids(tiny_base, tiny_zh_model, tmp_path):
    """The exact tokenizer.json layout (--new-piece-score exact): stock apply_chat_template agrees too."""
    from transformers import AutoTokenizer

    from cllama_dist.tokenizer.config import MergeConfig
    from cllama_dist.tokenizer.merge import merge

    out = tmp_path / "fast"
    merge(MergeConfig(base=str(tiny_base), add=str(tiny_zh_model), out=str(out), new_piece_score="exact"))
    assert (out / "tokenizer.json").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for name in ("alpaca", "llama2"):
        t = templates.builtin(name)
        templates.install_chat_template(out, t)
        tok = AutoTokenizer.from_pretrained(out)
        for conv in CONVERSATIONS + ([MULTI] if name == "llama2" else []):
            stock = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
            assert list(stock) == encode_prompt(conv, t, sp), (name, conv)


def test_chat_through_the_adapter_and_the_merged_model_agree(fake_run, tiny_model_dir, tmp_path, capsys):
    run = fake_run(templates.builtin("alpaca"))
    assert cli.main(["export", "adapter", "--run", str(run), "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["export", "merged", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "a"), "--out",
                     str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    talk = ["--temperature", "0", "--max-new-tokens", "8", "--message", "你好", "--message", "再见"]
    assert cli.main(["chat", "--model", str(tmp_path / "m"), "--json-out", str(tmp_path / "m.json"), *talk]) == 0
    merged = capsys.readouterr()
    assert cli.main(["chat", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "a"),
                     "--json-out", str(tmp_path / "a.json"), *talk]) == 0
    adapter = capsys.readouterr()
    assert "template alpaca" in merged.err and "template alpaca" in adapter.err
    assert merged.out == adapter.out and merged.out.count("\n") == 2
    ids = [[t["answer_ids"] for t in c] for c in json.loads((tmp_path / "m.json").read_text())["conversations"]]
    assert ids == [[t["answer_ids"] for t in c] for c in json.loads((tmp_path / "a.json").read_text())["conversations"]]


def test_runs_without_a_template_and_bad_manifests(fake_run, tiny_merged, tmp_path, capsys):
    # A pre-training run: no template in the manifest, none exported.
    meta = export.export_adapter(fake_run(None, name="pre"), tmp_path / "pre")
    assert meta["chat_template"] is None and "chat_template" not in json.loads(
        (tmp_path / "pre" / "tokenizer_config.json").read_text())
    # The data folder is gone: a note, no template; --template installs one, even over a read-only source file.
    ro = tmp_path / "ro_tok"
    shutil.copytree(tiny_merged, ro)
    (ro / "tokenizer_config.json").chmod(0o444)
    gone = fake_run("no manifest", tokenizer=ro, name="gone")
    capsys.readouterr()
    assert export.export_adapter(gone, tmp_path / "g1")["chat_template"] is None
    assert "cannot tell whether the run trained through a chat template" in capsys.readouterr().out
    meta = export.export_adapter(gone, tmp_path / "g2", template="llama2")
    assert meta["chat_template"]["name"] == "llama2"
    assert templates.from_tokenizer(tmp_path / "g2").sha256 == templates.builtin("llama2").sha256
    # --template that is not the run's is refused; so is a manifest whose text does not match its hash.
    with pytest.raises(UserError, match="is not the template the run trained with: alpaca"):
        export.export_adapter(fake_run(templates.builtin("alpaca"), name="a"), tmp_path / "x", template="llama2")
    bad = fake_run(templates.builtin("alpaca"), name="bad")
    m = json.loads((tmp_path / "runs" / "bad_data" / "manifest.json").read_text())
    m["template"]["source"] += " "
    (tmp_path / "runs" / "bad_data" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="edited after preprocessing"):
        export.export_adapter(bad, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # The checkpoint's own record of the template comes first (a built-in may be named by hash alone).
    alpaca = templates.builtin("alpaca")
    first = fake_run(None, name="state", state_template={"name": "alpaca", "sha256": alpaca.sha256})
    assert export.export_adapter(first, tmp_path / "s")["chat_template"]["sha256"] == alpaca.sha256
