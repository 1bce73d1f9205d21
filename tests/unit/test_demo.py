import json

from cllama_dist.demo import run_demo


def test_demo_tokenizer_stages_and_reuse(tmp_path, capsys):
    summary = run_demo(out=str(tmp_path / "demo"))
    assert summary["merge"]["new_vocab_size"] == summary["merge"]["orig_vocab_size"] + summary["merge"]["added"]
    assert summary["report"]["tokens_per_char_after"] * 2 < summary["report"]["tokens_per_char_before"]
    held = (tmp_path / "demo" / "corpus" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()
    train = (tmp_path / "demo" / "corpus" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert not set(held) & set(train)
    assert summary["shards"]["train"]["sequences"] > 0
    from cllama_dist.data.shards import load_manifest

    assert load_manifest(summary["shards"]["train"]["folder"])["tokenizer"]["vocab_size"] == summary["merge"]["new_vocab_size"]
    capsys.readouterr()
    run_demo(out=str(tmp_path / "demo"))
    out = capsys.readouterr().out
    assert out.count("reusing") == 6
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["merge"] == summary["merge"]
