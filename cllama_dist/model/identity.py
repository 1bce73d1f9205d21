"""What identifies a base model, so that a resume or an export against another base is refused.

A checkpoint holds only what trained (LoRA, new rows): the frozen base comes from the base model's folder
at every resume. Another base of the same shape would load without error and train on, silently (a grad
norm of 2 became 21 in the test that found this). The fingerprint is cheap at any model size: the config,
and per weight file its name, size, and a hash of its header and of four 64 KiB samples (safetensors keep
every tensor's name, dtype, shape and offset in the header; the samples tell apart two checkpoints of the
same architecture).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError
from .config import ModelConfig

SAMPLE = 1 << 16
# Config keys that change with the tool that saved the model, not with the model.
_VOLATILE = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "use_cache"}


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            h.update(head + f.read(min(n, 100_000_000)))
        for frac in (0.25, 0.5, 0.75, 1.0):
            f.seek(max(0, int(size * frac) - SAMPLE))
            h.update(f.read(SAMPLE))
    return h.hexdigest()


BUILT = "built from model.config"  # the source of a base with no folder (model.path empty)


def base_fingerprint(cfg: ModelConfig, seed: int) -> dict:
    """{"source", "sha256"}: the identity of the base a run trains on."""
    if not cfg.path:
        text = json.dumps(cfg.config, sort_keys=True)
        return {"source": f"{BUILT} (seed {seed})",
                "sha256": hashlib.sha256(f"{text}|seed={seed}".encode()).hexdigest()}
    return folder_fingerprint(Path(cfg.path))


def folder_fingerprint(folder: Path) -> dict:
    """{"source", "sha256"} of a Hugging Face model folder: its config (less the keys the saving tool sets) and
    its weight files."""
    folder = Path(folder)
    h = hashlib.sha256()
    try:
        config = json.loads((folder / "config.json").read_text())
        h.update(json.dumps({k: v for k, v in config.items() if k not in _VOLATILE}, sort_keys=True).encode())
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
        for p in weights:
            h.update(f"{p.name}:{p.stat().st_size}:{_file_digest(p)}".encode())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the base model {folder}: {exc}") from None
    if not weights:
        raise UserError(f"the base model {folder} has no weight files (*.safetensors or *.bin)")
    return {"source": str(folder), "sha256": h.hexdigest()}
