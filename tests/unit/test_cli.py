import json

from cllama_dist.assets import corpus_path
from cllama_dist.cli import main

from ..conftest import write_jsonl


def test_train_merge_report_through_the_cli(tmp_path, tiny_base, capsys):
    assert main(["tokenizer", "train", "--corpus", str(corpus_path()), "--out", str(tmp_path / "zh"),
                 "--vocab-size", "2600", "--threads", "1"]) == 0
    assert (tmp_path / "zh.model").is_file()
    assert main(["tokenizer", "merge", "--base", str(tiny_base), "--add", str(tmp_path / "zh.model"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert main(["tokenizer", "report", "--tokenizer", str(tiny_base), "--tokenizer", str(tmp_path / "merged"),
                 "--corpus", str(corpus_path()), "--json-out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "tok/char" in out and "extends" in out
    rows = json.loads((tmp_path / "r.json").read_text())["tokenizers"]
    assert rows[1]["reduction_vs_first"] > 2


def test_yaml_config_with_flag_override(tmp_path):
    (tmp_path / "t.yaml").write_text(f"inputs: [{corpus_path()}]\nvocab_size: 99999\nthreads: 1\n")
    assert main(["tokenizer", "train", "--config", str(tmp_path / "t.yaml"), "--vocab-size", "2600",
                 "--out", str(tmp_path / "zh")]) == 0
    (tmp_path / "bad.yaml").write_text("vocab_sise: 10\n")
    assert main(["tokenizer", "train", "--config", str(tmp_path / "bad.yaml")]) == 2



def test_report_skips_invalid_records_and_says_so(tmp_path, tiny_base, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "你好，世界。"}, {"body": "x"}])
    assert main(["tokenizer", "report", "--tokenizer", str(tiny_base), "--corpus", str(corpus)]) == 0
    assert "missing_field" in capsys.readouterr().out
