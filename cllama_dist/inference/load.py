"""Loading a model for inference: a Hugging Face model folder, its tokenizer, and an exported adapter on top.

    from cllama_dist.inference.load import load_model
    model, tokenizer, what, device = load_model(EvalConfig(model="base/", adapter="out/adapter"))

``load_model`` takes any config with model, adapter, tokenizer, device and dtype (EvalConfig, ChatConfig);
eval, chat and the demo load through it. ``read_adapter`` is what an adapter folder is checked with before
it is used, here and by ``cllama export merged``: our export, its tokenizer the one it trained with, the
base's vocabulary and weights the ones it trained on.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from ..errors import UserError
from ..model.config import resolve_dtype


class Tokenizer:
    """A SentencePiece tokenizer (tokenizer.model), or a Hugging Face one where a folder has no .model."""

    def __init__(self, path: Path):
        from ..tokenizer import spm

        self.path = path
        model_file = path if path.is_file() else path / spm.MODEL_FILE
        if model_file.is_file():
            self.sp = spm.processor(model_file)
            self.hf = None
            self.size = self.sp.get_piece_size()
            self.bos_id = self.sp.bos_id()
            self.model_file = model_file
        else:
            from transformers import AutoTokenizer

            try:
                self.hf = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError):
                raise UserError(f"no tokenizer in {path} (neither tokenizer.model nor a Hugging Face tokenizer; "
                                "pass --tokenizer)") from None
            self.sp = None
            self.size = len(self.hf)
            self.bos_id = self.hf.bos_token_id if self.hf.bos_token_id is not None else -1
            self.model_file = None

    @functools.cached_property
    def fingerprint(self) -> dict | None:
        """What shards are checked against (hashing the file: only computed when shards are evaluated)."""
        from ..tokenizer import spm

        return spm.fingerprint(self.model_file) if self.model_file is not None else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.sp is not None:
            return self.sp.encode(texts)
        return [self.hf.encode(t, add_special_tokens=False) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids) if self.sp is not None else self.hf.decode(ids, skip_special_tokens=True)


def pick_device(name: str):
    """The torch.device of ``--device`` (auto: CUDA where there is one)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device on this machine")
    return torch.device(name)


def load_model(cfg):
    """(model, tokenizer, description, device) for a model folder, optionally with an adapter on top.

    ``cfg`` is any config with model, adapter, tokenizer, device and dtype (EvalConfig, ChatConfig).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.adapters import DTYPES

    device = pick_device(cfg.device)
    dtype = DTYPES[resolve_dtype(cfg.dtype, device.type == "cuda")]
    try:
        config = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {cfg.model} is not a Hugging Face model folder: {exc}") from None
    tok_path = Path(cfg.tokenizer or cfg.adapter or cfg.model)
    tokenizer = Tokenizer(tok_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    except OSError as exc:  # transformers' "no file named model.safetensors ..." and unreadable files
        raise UserError(f"cannot load the model {cfg.model}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        from safetensors import SafetensorError

        if isinstance(exc, SafetensorError):  # a truncated or damaged weights file
            raise UserError(f"cannot load the model {cfg.model}: its weights are truncated or damaged "
                            f"({str(exc).splitlines()[0]})") from None
        raise
    what = f"{cfg.model}"
    if cfg.adapter:
        from peft import PeftModel

        meta, _ = read_adapter(cfg.adapter, cfg.model, config.vocab_size,
                               tokenizer=tokenizer.path if cfg.tokenizer else None, check_weights=False)
        # The trained model's rows (more than the tokens where padding rows remain); PEFT restores the new ones.
        model.resize_token_embeddings(meta.get("rows") or meta["new_vocab"], mean_resizing=False)
        try:
            model = PeftModel.from_pretrained(model, cfg.adapter)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"the adapter {cfg.adapter} does not fit the base {cfg.model} (another architecture?): "
                            f"{str(exc).splitlines()[0]}") from None
        # After PEFT: a base of another architecture is named as such; one of the same shape only by its weights.
        check_base(Path(cfg.model), meta.get("base_fingerprint"), Path(cfg.adapter))
        what += f" + adapter {cfg.adapter}"
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer.size > rows:
        raise UserError(f"the tokenizer {tok_path} has {tokenizer.size:,} pieces but the model {cfg.model} has "
                        f"{rows:,} embedding rows: a merged tokenizer with the base model? Pass the adapter "
                        "(--adapter) or the merged model")
    model.to(device).eval()
    from ..model.adapters import install_loss_forward

    # Scores through the chunked loss (no full logits; a chat or generation call without labels is unchanged).
    install_loss_forward(model, getattr(cfg, "loss", "chunked"), "torch")
    return model, tokenizer, what, device


# --------------------------------------------------------------------------------------------------
# An exported adapter.


def read_adapter(adapter: str | Path, base: str | Path, base_vocab: int, tokenizer: str | Path | None = None,
                 check_weights: bool = True):
    """The adapter's metadata and PEFT config, after checking it fits this base and this tokenizer.

    Refused, naming both sides: a folder that is not our export, a base whose vocabulary is not the one the
    adapter extends, a tokenizer (the adapter's own copy, or the one given) that is not the one it trained
    with, and (``check_weights``; else the caller calls ``check_base``) a base whose weights are not the ones
    it trained on.
    """
    from ..tokenizer import spm

    adapter = Path(adapter)
    meta_path = adapter / "cllama_export.json"
    if not adapter.is_dir():
        raise UserError(f"the adapter {adapter} is not a folder")
    if not meta_path.is_file() or not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{adapter} is not an adapter exported by `cllama export adapter` (no cllama_export.json / "
                        "adapter_config.json; an interrupted export leaves no cllama_export.json)")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise UserError(f"the adapter {adapter} has no weights file adapter_model.safetensors (copied without it?)")
    try:
        meta = json.loads(meta_path.read_text())
        acfg = json.loads((adapter / "adapter_config.json").read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise UserError(f"the adapter {adapter} has an unreadable cllama_export.json / adapter_config.json: {exc}") from None
    tok = Path(tokenizer) if tokenizer else adapter / "tokenizer.model"
    fp = spm.fingerprint(tok)
    if not spm.same_tokenizer(meta["tokenizer_sha256"], fp):
        raise UserError(f"the tokenizer {tok} (sha256 {fp['sha256'][:16]}..., {fp['vocab_size']:,} pieces) is not "
                        f"the one the adapter {adapter} was trained with (sha256 {meta['tokenizer_sha256'][:16]}..., "
                        f"{meta['new_vocab']:,} pieces)")
    expected = meta.get("base_vocab") or meta["orig_vocab"]
    if base_vocab != expected:
        what = "extends one of" if expected == meta["orig_vocab"] else "was trained on a merged model of"
        raise UserError(f"base {base} has a vocabulary of {base_vocab:,} rows; the adapter {adapter} {what} "
                        f"{expected:,} (another base model?)")
    if check_weights:
        check_base(Path(base), meta.get("base_fingerprint"), adapter)
    return meta, acfg


def check_base(base: Path, recorded: dict | None, adapter: Path) -> None:
    """Refuse a base whose weights are not those of the base the adapter's run trained on.

    ``recorded``: the run's fingerprint of its base (model/identity.py), which ``cllama export adapter``
    copies from the checkpoint. Another base of the same shape loads and merges without an error and gives
    a model that is silently wrong. The fingerprint hashes the config, each weight file's header and samples
    of its bytes: models trained or initialised apart differ in it; an edit of a few tensors may not show.
    Not checked: adapters exported before the fingerprint was copied, and runs whose base was built from
    model.config (no folder to compare with).
    """
    from ..model.identity import BUILT, folder_fingerprint

    if not isinstance(recorded, dict) or not recorded.get("sha256"):
        return
    if str(recorded.get("source", "")).startswith(BUILT):
        return
    fp = folder_fingerprint(base)
    if fp["sha256"] == recorded["sha256"]:
        return
    _check_readable(base)  # a damaged weights file is named as such, not as another model
    raise UserError(f"the base {base} (fingerprint {fp['sha256'][:16]}...) is not the model the adapter {adapter} was "
                    f"trained on: {recorded['source']} (fingerprint {recorded['sha256'][:16]}...); pass that model "
                    "(or an unchanged copy of it) as the base")


def _check_readable(base: Path) -> None:
    from safetensors import SafetensorError, safe_open

    for path in sorted(base.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError as exc:
            raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]} (truncated or damaged?)") from None
