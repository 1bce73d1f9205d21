"""Typed loading: every value, from YAML, a flag or Python, is checked against its declared type.

The table below gives, for each kind of field, a good value, the values PyYAML 1.1 and hurried users
produce, and the exact outcome: the coerced value, or the error text naming the file, the key and the value.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

import pytest

from cllama_dist.config import PathStr, Section, add_flags, build, check, coerce, from_sources, load, option
from cllama_dist.errors import UserError


@dataclass
class Inner(Section):
    """A nested section."""

    rate: float = option(1e-3, "A float.")
    steps: int = option(10, "An int.")

    def validate(self) -> None:
        check(self.rate > 0, "rate", f"must be positive, got {self.rate}")


@dataclass
class Cfg(Section):
    """A config with one field of each kind."""

    flag: bool = option(False, "A bool.")
    count: int = option(1, "An int.")
    rate: float = option(0.5, "A float.")
    name: str = option("x", "A string.")
    path: PathStr = option("", "A path.")
    mode: Literal["new-rows", "full"] = option("new-rows", "A choice.")
    files: list[PathStr] = option([], "A list of paths.")
    betas: list[float] = option([0.9, 0.95], "A list of floats.")
    extra: dict = option({}, "A mapping.")
    inner: Inner = option(Inner, "A section.")


# (field, value as PyYAML gives it, expected value or the error text)
TABLE = [
    ("flag", True, True),
    ("flag", False, False),
    ("flag", "no", "flag: expected true or false, got the string 'no' (write true or false, without quotes)"),
    ("flag", "true", "flag: expected true or false, got the string 'true'"),
    ("flag", 1, "flag: expected true or false, got 1 (int)"),
    ("count", 3, 3),
    ("count", "1000", 1000),
    ("count", "1e4", 10000),        # PyYAML 1.1 reads 1e4 (no dot) as a string
    ("count", 2.0, 2),
    ("count", 2.5, "count: expected a whole number, got 2.5"),
    ("count", True, "count: expected a whole number, got True (true/false)"),
    ("count", "ten", "count: expected a whole number, got the string 'ten'"),
    ("rate", 0.25, 0.25),
    ("rate", "2e-4", 2e-4),          # PyYAML 1.1 reads 2e-4 as a string
    ("rate", 3, 3.0),
    ("rate", ".inf", "rate: expected a number, got the string '.inf'"),
    ("rate", "nan", "rate: expected a finite number, got nan"),
    ("rate", "fast", "rate: expected a number, got the string 'fast'"),
    ("name", "sdpa", "sdpa"),
    ("name", 5, "name: expected a string, got 5 (int) (quote it)"),
    ("path", "data/x.jsonl", "data/x.jsonl"),
    ("path", ["a", "b"], "path: expected a path, got ['a', 'b'] (list)"),
    ("path", 7, "path: expected a path, got 7 (int)"),
    ("mode", "full", "full"),
    ("mode", "Full", "mode: 'Full' is not one of 'new-rows', 'full'; did you mean 'full'?"),
    ("mode", "rows", "mode: 'rows' is not one of 'new-rows', 'full'"),
    ("files", ["a.jsonl", "b.jsonl"], ["a.jsonl", "b.jsonl"]),
    ("files", "corpus.jsonl", ["corpus.jsonl"]),  # one string is one element, never its characters
    ("files", [1], "files[0]: expected a path, got 1 (int)"),
    ("betas", ["0.9", 0.99], [0.9, 0.99]),
    ("betas", 0.9, [0.9]),
    ("betas", {"a": 1}, "betas: expected a list, got a mapping {'a': 1}"),
    ("extra", {"a": 1}, {"a": 1}),
    ("extra", "{zero_optimization: {stage: 2}}", {"zero_optimization": {"stage": 2}}),
    ("extra", [1], "extra: expected a mapping, got [1] (list)"),
    ("inner", {"rate": "1e-4"}, Inner(rate=1e-4)),
    ("inner", 3, "inner: expected a mapping of Inner settings, got 3 (int)"),
]


@pytest.mark.parametrize("key,value,expected", TABLE, ids=[f"{k}={v!r}" for k, v, _ in TABLE])
def test_typed_loading_table(key, value, expected, tmp_path):
    import yaml

    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({key: value}))
    if isinstance(expected, str) and ":" in expected and expected.startswith(key.split(".")[0]):
        with pytest.raises(UserError) as err:
            load(Cfg, f)
        assert str(err.value).startswith(f"{f}: {expected}")
        assert len(str(err.value).splitlines()) == 1
    else:
        assert getattr(load(Cfg, f), key) == expected


def test_yaml_quirks_as_pyyaml_reads_them(tmp_path):
    """The literal YAML text, so that PyYAML's own reading of it is part of the test."""
    f = tmp_path / "q.yaml"
    f.write_text("rate: 2e-4\ncount: 1e3\nflag: no\nfiles: corpus.jsonl\nmode: full\n")  # unquoted no: false
    c = load(Cfg, f)
    assert (c.rate, c.count, c.flag, c.files, c.mode) == (2e-4, 1000, False, ["corpus.jsonl"], "full")
    f.write_text('flag: "no"\n')
    with pytest.raises(UserError, match=r"q.yaml: flag: expected true or false, got the string 'no'"):
        load(Cfg, f)


def test_unknown_keys_are_refused_with_the_known_ones(tmp_path):
    f = tmp_path / "u.yaml"
    f.write_text("inner: {rat: 1}\n")
    with pytest.raises(UserError, match=r"u.yaml: inner.rat: unknown setting \(did you mean 'rate'\?\); the settings "
                                        r"here are rate, steps"):
        load(Cfg, f)


def test_range_checks_name_the_nested_key_and_file(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("inner: {rate: -1}\n")
    with pytest.raises(UserError, match=r"r.yaml: inner.rate: must be positive, got -1.0"):
        load(Cfg, f)


def test_python_construction_is_checked_too():
    assert Cfg(rate="2e-4", files="a.jsonl").files == ["a.jsonl"]
    with pytest.raises(UserError, match="mode: 'Full' is not one of"):
        Cfg(mode="Full")
    with pytest.raises(UserError, match="rate: must be positive"):
        Inner(rate=0)


def test_dotted_keys_in_yaml(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("inner.steps: 5\nrate: 0.1\n")  # a dotted key; and rate is Cfg's own field, not inner's
    c = load(Cfg, f)
    assert (c.inner.steps, c.rate, c.inner.rate) == (5, 0.1, 1e-3)
    with pytest.raises(UserError, match=r"^steps: unknown setting"):  # a flat name is no key of Cfg's
        build(Cfg, {"steps": "7"})


def _parse(argv, tmp_path, yaml_text=""):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_flags(p, Cfg)
    f = tmp_path / "base.yaml"
    f.write_text(yaml_text or "{}\n")
    return from_sources(Cfg, p.parse_args(argv), str(f))


def test_flags_override_yaml_with_the_same_checks(tmp_path):
    c = _parse(["--inner.rate", "1e-5", "--inner.steps", "3", "--files", "a", "b", "--flag", "--mode", "full"],
               tmp_path, "inner: {rate: 0.1}\nfiles: [x]\n")
    assert (c.inner.rate, c.inner.steps, c.flag, c.mode) == (1e-5, 3, True, "full")
    assert c.files == ["a", "b"]  # a flag replaces the YAML list
    with pytest.raises(UserError, match=r"^--inner\.rate: expected a number, got the string 'abc'$"):
        _parse(["--inner.rate", "abc"], tmp_path)
    with pytest.raises(UserError, match=r"^--mode: 'Full' is not one of 'new-rows', 'full'; did you mean 'full'\?$"):
        _parse(["--mode", "Full"], tmp_path)


def test_coerce_optional_and_any():
    from typing import Any, Optional

    assert coerce(None, Optional[int], "k") is None
    assert coerce("3", Optional[int], "k") == 3
    assert coerce([1, "a"], Any, "k") == [1, "a"]
    with pytest.raises(UserError, match="k: a value is required"):
        coerce(None, int, "k")
