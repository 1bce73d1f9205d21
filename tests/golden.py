"""Golden figures: values recorded from a known-good commit, kept in tests/assets/golden/, compared in tests.

    CLLAMA_UPDATE_GOLDEN=1 bash tests/run.sh tests/integration/test_train.py   # re-record (review the diff!)

A refactor must leave these unchanged (within the tolerance each test states); a change of numerics
must re-record them in a commit of its own that says why.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "assets" / "golden"


def _path(name: str) -> Path:
    return GOLDEN / f"{name}.json"


def load(name: str) -> dict:
    return json.loads(_path(name).read_text(encoding="utf-8"))


def check(name: str, values: dict, rel: float = 0.0, abs: float = 0.0) -> None:
    """Compare ``values`` (a JSON-able mapping of numbers, strings, lists, mappings) with the golden file.

    Numbers compare within ``rel`` / ``abs``; everything else exactly. With CLLAMA_UPDATE_GOLDEN=1 the
    file is written instead.
    """
    values = json.loads(json.dumps(values))  # int keys become strings, as in the file
    if os.environ.get("CLLAMA_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(parents=True, exist_ok=True)
        _path(name).write_text(json.dumps(values, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                               encoding="utf-8")
        return
    expected = load(name)
    problems: list[str] = []
    _compare(expected, values, name, rel, abs, problems)
    assert not problems, f"golden {name} differs:\n  " + "\n  ".join(problems[:20])


def _compare(want, got, where: str, rel: float, abs_: float, out: list[str]) -> None:
    if isinstance(want, dict) and isinstance(got, dict):
        if want.keys() != got.keys():
            out.append(f"{where}: keys {sorted(want)} expected, got {sorted(got)}")
            return
        for k in want:
            _compare(want[k], got[k], f"{where}.{k}", rel, abs_, out)
    elif isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            out.append(f"{where}: {len(want)} items expected, got {len(got)}")
            return
        for i, (a, b) in enumerate(zip(want, got)):
            _compare(a, b, f"{where}[{i}]", rel, abs_, out)
    elif isinstance(want, (int, float)) and isinstance(got, (int, float)) and not isinstance(want, bool):
        if not math.isclose(want, got, rel_tol=rel, abs_tol=abs_):
            out.append(f"{where}: {want!r} expected, got {got!r}")
    elif want != got:
        out.append(f"{where}: {want!r} expected, got {got!r}")
