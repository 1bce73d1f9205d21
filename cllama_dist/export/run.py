"""Export a training run: a PEFT adapter that stock PEFT loads, with the new embedding rows inside it.

    cllama export adapter --run runs/7b [--step 1000] --out out/adapter

What trained is read from the ZeRO checkpoint itself (DeepSpeed's fp32 reconstruction of the
partitions, on the CPU, no GPU or process group): only the trainable tensors, so the adapter can never be
PEFT's "40-byte empty adapter" of a ZeRO-3 save made without gathering the partitions (PEFT #2450), and its
size is the trained parameters' alone.

The new rows go in PEFT's own trainable-tokens format (``trainable_token_indices`` in adapter_config.json,
``token_adapter.trainable_tokens_delta`` tensors holding the rows' values): stock
``PeftModel.from_pretrained(base_resized_to_len_tokenizer, DIR)`` restores them into embed_tokens and
lm_head. This format stores the n_new x H rows only; ``save_embedding_layers`` would store the whole
V' x H matrices of which the first V rows are the base's unchanged rows. With ``embeddings: full`` every
row trained, so the indices cover the whole vocabulary.

Instruction tuning: the chat template a run trained through (named, with its text and sha256, in the
run's data manifest) is written as ``chat_template`` into the exported tokenizer_config.json, so that
stock ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` formats inference prompts
as training formatted them, and ``cllama chat`` / ``cllama eval --generate`` find it. Its name and
sha256 go into cllama_export.json; ``export merged`` carries the adapter folder's template over.

The base: the checkpoint's fingerprint of the model the run trained on (model/identity.py) goes into
cllama_export.json, and ``export merged`` refuses a base with other weights before writing anything, as a
load of the adapter does (``read_adapter`` in inference/load.py).
"""

from __future__ import annotations

import json
import pickle
import shutil
import stat
from pathlib import Path

import torch

from .. import __version__
from ..config import build
from ..errors import UserError
from ..files import LOCK, Lock, check_not_input, claim_folder, os_error, write_atomic
from ..inference.load import read_adapter
from ..model.vocab import BASE_ROWS, NEW_ROWS
from ..sft import templates
from ..sft.templates import Template
from ..tokenizer import hf
from ..trainer import checkpoint
from ..trainer.config import TrainConfig

EMB_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
HEAD_KEY = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
TOKENIZER_FILES = (*hf.FOLDER_FILES, "merge_report.json", "chat_template.jinja")


def pick_checkpoint(run_dir: str | Path, step: int | None) -> Path:
    """The newest valid checkpoint of a run (or the one of ``step``), checked file by file as a resume is; never
    a damaged one (trainer/checkpoint.py ``pick``)."""
    path, notes = checkpoint.pick(run_dir, step)
    for note in notes:
        print(note, flush=True)
    return path


class _Export:
    """An export's output folder: checked against the inputs, locked, marked; what this attempt wrote is
    removed again if it fails (a full disk), so a half-written export never looks like one."""

    def __init__(self, out: str | Path, kind: str, inputs: dict, overwrite: bool):
        self.out, self.kind = Path(out), kind
        check_not_input(self.out, inputs, kind)
        # The lock lives beside the folder: nothing is written into a folder before it is known to be ours.
        self.lock = Lock(self.out.parent / f".{self.out.name}{LOCK}", f"{kind} export")
        self.inputs, self.overwrite = inputs, overwrite
        self.written: list[Path] = []

    def __enter__(self) -> "_Export":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.lock.__enter__()
        try:
            claim_folder(self.out, self.kind, overwrite=self.overwrite)
        except BaseException:
            self.lock.release()
            raise
        return self

    def path(self, name: str) -> Path:
        p = self.out / name
        self.written.append(p)
        return p

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if exc is not None:
                for p in self.written:
                    p.unlink(missing_ok=True)
                if isinstance(exc, OSError):
                    raise os_error(exc, self.out) from None
        finally:
            self.lock.release()
        return False


def trained_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from ..quiet import muted_stdout, name_accelerator

    # Importing DeepSpeed warns that it guessed the accelerator; reading the checkpoint prints four lines of its
    # progress. Neither tells a user anything. What goes wrong is raised (and said here in one line), and
    # DeepSpeed's own warnings go through its logger, whose stream the muting leaves alone.
    name_accelerator(torch.cuda.is_available())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with muted_stdout():
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name,
                                                          exclude_frozen_parameters=True)
    except (ValueError, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:
        # A checkpoint without files.json (older) is not checked file by file before this: a missing or cut
        # partition is found here.
        raise UserError(f"cannot read the ZeRO checkpoint {ckpt}: {str(exc).splitlines()[0]}") from None
    empty = [k for k, v in sd.items() if v.numel() == 0]
    if empty or not sd:
        raise UserError(f"{ckpt} holds empty tensors ({empty[:3]}...): a ZeRO-3 save made without gathering")
    return sd


# --------------------------------------------------------------------------------------------------
# The chat template of a run.


def template_entry(entry, where: str) -> Template:
    """A manifest's ``template`` entry ({name, sha256, source}) as a Template, its text checked against its hash."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise UserError(f"{where}: the template entry must be a mapping with name, sha256 and source, not {entry!r}")
    name, sha, source = entry["name"], entry.get("sha256"), entry.get("source")
    if source is None:
        if name in templates.BUILTIN and templates.builtin(name).sha256 == sha:
            return Template(name, templates.BUILTIN[name], where)
        raise UserError(f"{where}: the template entry {name!r} has no source text (and is not a built-in of that sha256)")
    if not isinstance(source, str):
        raise UserError(f"{where}: the template entry {name!r} has a source that is not text")
    t = templates.from_jinja(source, name=name, origin=where)
    if sha is not None and t.sha256 != sha:
        raise UserError(f"{where}: the text of template {name!r} has sha256 {t.sha256[:16]}..., the entry records "
                        f"{str(sha)[:16]}... (edited after preprocessing?)")
    return t


def run_template(state: dict, cfg: TrainConfig) -> tuple[Template | None, str | None]:
    """The chat template a run trained through, or None (a pre-training run), and a note when it cannot be told.

    Looked for in the checkpoint's trainer_state.json (``template``, where the trainer records it) and
    then in the manifest of the run's data folder (``template``, which the SFT preprocessor writes).
    """
    from ..data.shards import MANIFEST

    if state.get("template") is not None:
        return template_entry(state["template"], "the checkpoint's trainer_state.json"), None
    if not cfg.data.path:
        return None, None
    path = Path(cfg.data.path) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        why = "missing" if isinstance(exc, FileNotFoundError) else f"unreadable ({exc})"
        return None, (f"note: the run's data manifest {path} is {why}: cannot tell whether the run trained through "
                      "a chat template; exporting without one (--template NAME|FILE installs one)")
    entry = manifest.get("template") if isinstance(manifest, dict) else None
    return (template_entry(entry, str(path)) if entry is not None else None), None


def choose_template(state: dict, cfg: TrainConfig, spec: str = "") -> Template | None:
    """The template to export: the run's, or ``spec`` (a built-in name or a file), refused when the run names another."""
    found, note = run_template(state, cfg)
    if not spec:
        if note:
            print(note, flush=True)
        return found
    given = templates.resolve(spec, cfg.model.tokenizer or None)
    if found is not None and found.sha256 != given.sha256:
        raise UserError(f"--template {spec} (sha256 {given.sha256[:16]}...) is not the template the run trained with: "
                        f"{found.name} (sha256 {found.sha256[:16]}..., {found.origin}); leave --template out")
    return found or given


def install_template(ex: "_Export", template: Template | None) -> dict | None:
    """Write ``template`` into the exported tokenizer_config.json; what the folder's chat template now is."""
    cfg_path = ex.out / "tokenizer_config.json"
    if template is not None:
        if not cfg_path.is_file():
            raise UserError(f"the run trained through chat template {template.name}, but the tokenizer folder gave "
                            f"{ex.out} no tokenizer_config.json to write it into")
        cfg_path.chmod(cfg_path.stat().st_mode | stat.S_IWUSR)  # copied with a read-only source's mode bits
        templates.install_chat_template(ex.out, template)
        return {"name": template.name, "sha256": template.sha256, "origin": template.origin}
    if templates.has_template(ex.out):  # the tokenizer's own, copied with it
        t = templates.from_tokenizer(ex.out)
        return {"name": "tokenizer", "sha256": t.sha256, "origin": "copied with the tokenizer"}
    return None


def export_adapter(run_dir: str | Path, out: str | Path, step: int | None = None, overwrite: bool = False,
                   template: str = "") -> dict:
    """Write the adapter of ``run_dir``'s newest valid checkpoint (or of ``step``) into ``out``.

    ``template``: "" exports the chat template the run trained through (none for a pre-training run); a
    built-in name or a Jinja file installs that one (refused when the run names another).
    """
    ckpt = pick_checkpoint(run_dir, step)
    state = checkpoint.read_state(ckpt)
    cfg: TrainConfig = build(TrainConfig, state["config"])
    chat_template = choose_template(state, cfg, template)
    orig, new = state["orig_vocab"], state["new_vocab"]
    # A tied run trained one block of rows (lm_head is embed_tokens): PEFT ties the head's rows to it on load.
    # ``total``: the trained model's rows, more than ``new`` where padding rows beyond every token remain.
    tied, total = bool(state.get("tied")), (state.get("rows") or {}).get("rows") or new
    sd = trained_tensors(ckpt)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if ".lora_" in key:
            tensors[key.replace(".default.weight", ".weight")] = value.contiguous()
    ends = (("base_model.model.model.embed_tokens.", EMB_KEY),) + (() if tied else (("base_model.model.lm_head.", HEAD_KEY),))
    for prefix, target in ends:
        rows = sd.get(prefix + NEW_ROWS)
        if rows is None or rows.shape[0] != total - orig:
            raise UserError(f"{ckpt}: {prefix}{NEW_ROWS} missing or not {total - orig} rows")
        if state["embeddings"] == "full":
            rows = torch.cat([sd[prefix + BASE_ROWS], rows])
        tensors[target] = rows.contiguous()
    indices = list(range(0 if state["embeddings"] == "full" else orig, total))
    with _Export(out, "adapter", {"run": run_dir, "tokenizer": cfg.model.tokenizer}, overwrite) as ex:
        meta = _write_adapter(ex, run_dir, ckpt, state, cfg, tensors, indices, orig, new, chat_template)
    return meta


def _write_adapter(ex: "_Export", run_dir, ckpt: Path, state: dict, cfg: TrainConfig, tensors: dict, indices: list,
                   orig: int, new: int, chat_template: Template | None = None) -> dict:
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = ex.out
    save_file(tensors, str(ex.path("adapter_model.safetensors")), metadata={"format": "pt"})
    lora = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.targets), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=cfg.model.path or None,
                      trainable_token_indices={"embed_tokens": indices} if state.get("tied")
                      else {"embed_tokens": indices, "lm_head": indices})
    ex.path("adapter_config.json")
    lora.save_pretrained(str(out))
    tok_dir = Path(cfg.model.tokenizer)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy(tok_dir / name, ex.path(name))
    installed = install_template(ex, chat_template)
    meta = {"tool": f"cllama-dist {__version__}", "run": str(run_dir), "checkpoint": str(ckpt), "step": state["step"],
            "base_model": cfg.model.path or "built from model.config", "model_config": cfg.model.config or None,
            "orig_vocab": orig, "new_vocab": new, "embeddings": state["embeddings"],
            # The rows of the base this adapter applies to: orig_vocab, or new_vocab for a run that started
            # from a merged (already extended) model, as instruction tuning does.
            "base_vocab": state.get("base_vocab") or orig,
            # The run's fingerprint of its base (model/identity.py): a merge or load onto another base is refused.
            "base_fingerprint": state.get("base_model") or None,
            "tied": bool(state.get("tied")), "rows": (state.get("rows") or {}).get("rows") or new,
            "vocab_rows": state.get("rows") or {},
            "tokenizer_sha256": state["tokenizer_sha256"], "chat_template": installed,
            "trained_parameters": int(sum(v.numel() for v in tensors.values())), "train_config": state["config"]}
    chat_note = ""
    if installed is not None:
        chat_note = (f"tokenizer_config.json carries the chat template `{installed['name']}` (sha256 "
                     f"{installed['sha256'][:16]}...): `tok.apply_chat_template(messages, add_generation_prompt=True)` "
                     "formats a prompt as training did; `cllama chat --model BASE --adapter ADAPTER_DIR` chats "
                     "through it.\n\n")
    ex.path("README.md").write_text(
        f"# LoRA adapter + {new - orig:,} new embedding rows (cllama-dist)\n\n"
        f"Step {state['step']} of `{run_dir}`. Base: `{meta['base_model']}`, vocabulary {orig:,} -> {new:,}.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\nfrom peft import PeftModel\n\n"
        "tok = AutoTokenizer.from_pretrained(ADAPTER_DIR)\nbase = AutoModelForCausalLM.from_pretrained(BASE)\n"
        f"base.resize_token_embeddings({meta['rows']})  # the trained model's rows; restored from the adapter\n"
        "model = PeftModel.from_pretrained(base, ADAPTER_DIR)\n```\n\n" + chat_note +
        "cllama_export.json records the tokenizer and base model fingerprints, the chat template and the training "
        "config.\n")
    # Last: an adapter folder without it is an interrupted export, refused by read_adapter.
    write_atomic(ex.path("cllama_export.json"), json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta


def _base_shards(base: Path) -> list[str]:
    index = base / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (base / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise UserError(f"{base} has no safetensors weights (model.safetensors or model.safetensors.index.json)")


def base_dtype(base: Path, config) -> str:
    """The base's weight dtype: the config's, else that of its first floating tensor."""
    names = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "F32": "fp32", "BF16": "bf16", "F16": "fp16"}
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if declared is not None and str(declared).removeprefix("torch.") in names:
        return names[str(declared).removeprefix("torch.")]
    from safetensors import safe_open

    with safe_open(str(base / _base_shards(base)[0]), framework="pt") as f:
        for name in f.keys():
            code = f.get_slice(name).get_dtype()
            if code in names:
                return names[code]
    return "fp32"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except OSError as exc:
        raise os_error(exc, path, "read") from None
    except SafetensorError as exc:  # a truncated or damaged file
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]} (truncated or damaged?)") from None


def export_merged(base: str | Path, adapter: str | Path, out: str | Path, dtype: str = "auto",
                  overwrite: bool = False) -> dict:
    """Merge an exported adapter into its base, one weight shard at a time (never the whole model twice).

    Each LoRA target becomes W + (alpha / r) B A; embed_tokens and lm_head grow to len(tokenizer) with the
    adapter's rows; every other tensor is copied. The base's sharding is kept; config.vocab_size is the
    new vocabulary; the tokenizer is written beside the weights. ``dtype`` auto keeps the base's.
    """
    from transformers import AutoConfig

    from ..model.adapters import DTYPES

    base, adapter, out = Path(base), Path(adapter), Path(out)
    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise UserError(f"the base {base} is not a Hugging Face model folder: {str(exc).splitlines()[0]}") from None
    meta, acfg = read_adapter(adapter, base, config.vocab_size)
    dtype = base_dtype(base, config) if dtype == "auto" else dtype
    chat_template = adapter_template(adapter, meta)
    with _Export(out, "merged-model", {"base model": base, "adapter": adapter}, overwrite) as ex:
        n_shards, n_lora = _write_merged(ex, base, adapter, config, meta, acfg, DTYPES[dtype], chat_template, dtype)
    return {"out": str(out), "shards": n_shards, "vocab_size": meta["new_vocab"], "lora_modules": n_lora, "dtype": dtype,
            "chat_template": chat_template}


def adapter_template(adapter: Path, meta: dict) -> dict | None:
    """The adapter folder's chat template ({name, sha256, origin}) as a merged model carries it over, or None.

    The text is the one in the adapter's tokenizer_config.json (copied with the tokenizer); its name is
    the one cllama_export.json records when the hashes agree, else "tokenizer".
    """
    if not templates.has_template(adapter):
        return None
    t = templates.from_tokenizer(adapter)
    recorded = meta.get("chat_template") or {}
    name = recorded.get("name") if recorded.get("sha256") == t.sha256 else "tokenizer"
    return {"name": name or "tokenizer", "sha256": t.sha256, "origin": str(adapter)}


def _write_merged(ex: "_Export", base: Path, adapter: Path, config, meta: dict, acfg: dict,
                  torch_dtype: torch.dtype, chat_template: dict | None = None, dtype: str = "") -> tuple[int, int]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    new = meta["new_vocab"]
    tensors = _load_safetensors(adapter / "adapter_model.safetensors")
    scale = acfg["lora_alpha"] / acfg["r"]
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if ".lora_" in key:
            module, kind = key.split(".lora_")
            lora.setdefault(module.removeprefix("base_model.model."), {})[kind.split(".")[0]] = value
    # A tied adapter has one block of rows and the merged model one matrix (config.tie_word_embeddings kept).
    tied, total = bool(meta.get("tied")), meta.get("rows") or new
    rows = {"model.embed_tokens.weight": tensors[EMB_KEY]} if tied else {"model.embed_tokens.weight": tensors[EMB_KEY],
                                                                         "lm_head.weight": tensors[HEAD_KEY]}
    indices = torch.tensor(acfg["trainable_token_indices"]["embed_tokens"])
    shards = _base_shards(base)
    weight_map, used = {}, set()
    for i, shard in enumerate(shards):
        merged = {}
        try:
            with safe_open(str(base / shard), framework="pt") as f:
                for name in f.keys():
                    if tied and name == "lm_head.weight":  # a copy of the tied matrix some writers keep: not saved
                        continue
                    t = f.get_tensor(name).float()
                    module = name.removesuffix(".weight")
                    if module in lora:
                        if t.shape[1] != lora[module]["A"].shape[1]:
                            raise UserError(f"{name}: base shape {tuple(t.shape)} does not fit the adapter's LoRA "
                                            f"{tuple(lora[module]['A'].shape)} (another architecture?)")
                        t = t + scale * (lora[module]["B"].float() @ lora[module]["A"].float())
                        used.add(module)
                    elif name in rows:
                        grown = torch.cat([t, torch.zeros(max(total - t.shape[0], 0), t.shape[1])])
                        grown[indices] = rows[name].float()
                        t = grown
                        used.add(name)
                    merged[name] = t.to(torch_dtype).contiguous()
        except SafetensorError as exc:  # a truncated or damaged shard
            raise UserError(f"cannot read {base / shard}: {str(exc).splitlines()[0]} (truncated or damaged?)") from None
        name_out = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(merged, str(ex.path(name_out)), metadata={"format": "pt"})
        weight_map.update({k: name_out for k in merged})
        del merged
    missing = (set(lora) | set(rows)) - used
    if missing:
        raise UserError(f"the base has no tensor for {sorted(missing)[:3]}... of the adapter (another architecture?)")
    if len(shards) > 1:
        write_atomic(ex.path("model.safetensors.index.json"),
                     json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    for name in TOKENIZER_FILES:
        if (adapter / name).is_file():
            shutil.copy(adapter / name, ex.path(name))
    if (base / "generation_config.json").is_file():
        shutil.copy(base / "generation_config.json", ex.path("generation_config.json"))
    record = {"tool": f"cllama-dist {__version__}", "kind": "merged", "base": str(base), "adapter": str(adapter),
              "dtype": dtype, "orig_vocab": meta["orig_vocab"], "new_vocab": new, "rows": total, "tied": tied,
              "base_rows": meta.get("base_vocab") or meta["orig_vocab"],
              "tokenizer_sha256": meta["tokenizer_sha256"], "chat_template": chat_template,
              "adapter_export": {k: meta.get(k) for k in ("run", "checkpoint", "step", "embeddings", "chat_template")}}
    write_atomic(ex.path("cllama_export.json"), json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    # Last: config.json makes the folder loadable; an interrupted export leaves none.
    config.vocab_size = total
    config.dtype = torch_dtype
    ex.path("config.json")
    config.save_pretrained(ex.out)
    return len(shards), len(lora)
