"""The stage runner: named stages, each run once into its own folder and reused while its inputs are unchanged.

A stage's *key* is what its result depends on (settings, earlier results, input file hashes); a finished
stage writes FOLDER/.done.json with the key's digest and its result, and a later run with the same key
reuses it. A *resumable* stage (training) that was interrupted is continued in place when its key is
unchanged, instead of being wiped.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class Reached(Exception):
    """Raised after the stage named by ``until``."""


@dataclass(frozen=True)
class RecipeStep:
    """One step of a recipe (a demo stage): ``run(folder, results)`` does the work and returns a JSON-able result;
    ``key(results)`` says what that result depends on (``results``: the earlier stages' results by name)."""

    name: str
    run: Callable[[Path, dict[str, dict]], dict]
    key: Callable[[dict[str, dict]], dict]
    resumable: bool = False


def file_key(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class StageRunner:
    def __init__(self, out: Path, force: bool, total: int, until: str | None = None):
        self.out, self.force, self.total, self.n, self.until = Path(out), force, total, 0, until
        self.summary: dict[str, dict] = {}

    def run_all(self, stages: list[RecipeStep]) -> dict[str, dict]:
        for stage in stages:
            self.run(stage.name, stage.key(self.summary), lambda folder, s=stage: s.run(folder, self.summary),
                     resumable=stage.resumable)
        return self.summary

    def run(self, name: str, key: dict[str, Any], fn: Callable[[Path], dict], resumable: bool = False) -> dict:
        self.n += 1
        folder = self.out / name
        marker = folder / ".done.json"
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        if not self.force and marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("key") == digest:
                print(f"[{self.n}/{self.total}] {name}: reusing {folder} (finished earlier; --force to redo)", flush=True)
                self.summary[name] = done["result"]
                if name == self.until:
                    raise Reached(name)
                return done["result"]
        started = folder / ".started.json"
        if resumable and not self.force and started.is_file() and json.loads(started.read_text()).get("key") == digest:
            print(f"[{self.n}/{self.total}] {name}: resuming the unfinished stage in {folder}", flush=True)
        else:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            started.write_text(json.dumps({"key": digest}) + "\n")
        print(f"[{self.n}/{self.total}] {name} ...", flush=True)
        t0 = time.time()
        result = fn(folder)
        result["seconds"] = round(time.time() - t0, 1)
        marker.write_text(json.dumps({"key": digest, "result": result}, indent=2, ensure_ascii=False) + "\n")
        print(f"[{self.n}/{self.total}] {name}: done in {result['seconds']}s", flush=True)
        self.summary[name] = result
        if name == self.until:
            raise Reached(name)
        return result
