"""Build the model that trains: a LLaMA base, its vocabulary extended, LoRA on the projections.

What trains: LoRA weights, plus the appended rows of embed_tokens and lm_head held as their own
parameters (``model.embeddings: new-rows``), or both whole matrices (``full``, the paper's choice).
Everything else is frozen, structurally (model/vocab.py says why a gradient mask would not do).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .config import LoraConfig, ModelConfig, resolve_attn
from .vocab import SplitEmbedding, SplitLMHead, extend_vocab, is_embedding_param, is_new_rows, split_vocab

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_llama_config(cfg: ModelConfig):
    from transformers import AutoConfig, LlamaConfig

    if cfg.path:
        try:
            config = AutoConfig.from_pretrained(cfg.path)
        except (OSError, ValueError) as exc:
            raise UserError(f"model {cfg.path} is not a Hugging Face model folder: {exc}") from None
    else:
        try:
            config = LlamaConfig(**{"tie_word_embeddings": False, **cfg.config})
        except (TypeError, ValueError) as exc:
            raise UserError(f"model.config is not a valid LlamaConfig: {exc}") from None
    config.use_cache = False
    return config


def _device_kind(dtype: torch.dtype) -> tuple[bool, str]:
    """(on a GPU, dtype name) as model.attn_implementation's auto reads them; the GPU rule is distributed.init's."""
    import os

    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    return cuda, {v: k for k, v in DTYPES.items()}[dtype]


def build_base(cfg: ModelConfig, config, dtype: torch.dtype, zero3_ds_config: dict | None, seed: int,
               packed_rows: bool = False):
    """The base model: loaded (partitioned as it loads under ZeRO-3) or built from config, seeded.

    Built from a config, the model is made whole on the CPU with the run's seed, so every rank and every
    world size gets the same weights (deepspeed.initialize partitions it afterwards). Returns the model
    and the HfDeepSpeedConfig that must stay alive while transformers loads under ZeRO-3.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    keep_alive = None
    attn = resolve_attn(cfg.attn_implementation, *_device_kind(dtype), packed_rows=packed_rows)
    if cfg.path:
        if zero3_ds_config is not None:
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(zero3_ds_config)  # makes from_pretrained load into zero.Init
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attn)
    else:
        config._attn_implementation = attn
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype)
    return model, keep_alive


def apply_lora(model: nn.Module, lora_cfg: LoraConfig, embeddings: str, seed: int) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = PeftLoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=list(lora_cfg.targets), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed + 1)  # identical LoRA initialisation on every rank and world size
    try:
        # autocast_adapter_dtype=False: LoRA weights take the base dtype; DeepSpeed asserts on mixed dtypes
        # and keeps fp32 master copies itself.
        model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    except ValueError as exc:
        raise UserError(f"LoRA could not be applied (lora.targets {lora_cfg.targets}): {exc}") from None
    # PEFT froze everything but LoRA; the vocabulary's trainable parts train too.
    for module in model.modules():
        if isinstance(module, (SplitEmbedding, SplitLMHead)):
            module.weight_new.requires_grad_(True)
            module.weight_base.requires_grad_(embeddings == "full")
    return model


def enable_checkpointing(model: nn.Module, scope: str) -> list[int]:
    """Non-reentrant gradient checkpointing of the decoder layers ``model.checkpoint_scope`` names (flops.py's
    ``checkpointed_layers``); returns their indices. A layer left out keeps its activations for the backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from .flops import checkpointed_layers

    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # Set per layer here rather than through transformers' every_n_layers (newer than some supported versions):
    # the same rule, one place (flops.py) for what is recomputed and what is counted.
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = checkpointed_layers(len(layers), scope)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
    return chosen


def is_extended(cfg: ModelConfig, rows: int, orig_vocab: int, new_vocab: int) -> bool:
    """Whether the model's vocabulary is already extended (a merged pre-trained model: instruction tuning starts
    from its trained rows). Its rows equal the merged tokenizer's length; or, for a base with padding rows beyond
    every token, the merge's record (cllama_export.json, written by `cllama export merged`) names that length."""
    if rows == new_vocab != orig_vocab:
        return True
    record = Path(cfg.path) / "cllama_export.json" if cfg.path else None
    if record is None or not record.is_file():
        return False
    try:
        done = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return done.get("kind") == "merged" and done.get("new_vocab") == new_vocab and done.get("rows") == rows


def build_model(cfg: ModelConfig, lora_cfg: LoraConfig, seed: int, orig_vocab: int, new_vocab: int,
                dtype: torch.dtype, zero3_ds_config: dict | None = None, subword_ids=None,
                packed_rows: bool = False, loss_kernel: str = "torch"):
    """Base + extended vocabulary + LoRA + gradient checkpointing + the loss (``cfg.loss`` with the resolved
    ``loss_kernel``: loss.resolve_kernel's answer). Returns (model, keep_alive)."""
    config = load_llama_config(cfg)
    # Rows, not tokens (DESIGN B7): the model's row count is its config's, at least the base tokenizer's
    # length (rows beyond it are padding, reused first for the new tokens).
    rows = config.vocab_size
    extended = is_extended(cfg, rows, orig_vocab, new_vocab)
    if rows < orig_vocab:
        raise UserError(f"vocabulary mismatch: the base model has {rows:,} rows, the merged "
                        f"tokenizer has {new_vocab:,} pieces over a base of {orig_vocab:,} (wrong base model or "
                        "tokenizer?)")
    model, keep_alive = build_base(cfg, config, dtype, zero3_ds_config, seed, packed_rows)
    if extended:
        split_vocab(model, orig_vocab, new_vocab, train_base=cfg.embeddings == "full")
    else:
        # auto: the spellings where the base tokenizer gave them (trainer/setup.py decides), else the mean.
        init = cfg.new_row_init if cfg.new_row_init != "auto" else ("subword" if subword_ids is not None else "mean")
        extend_vocab(model, orig_vocab, new_vocab, init, cfg.new_row_std, subword_ids, seed,
                     train_base=cfg.embeddings == "full", rows=rows)
    if cfg.gradient_checkpointing:
        # Non-reentrant: the reentrant variant loses gradients when the inputs of a checkpointed block do
        # not require grad, which is the case with a frozen base (PEFT #1142: "element 0 of tensors does
        # not require grad").
        enable_checkpointing(model, cfg.checkpoint_scope)
    model = apply_lora(model, lora_cfg, cfg.embeddings, seed)
    install_loss_forward(model, cfg.loss, loss_kernel)
    return model, keep_alive


LOSS_MARK = "_cllama_loss"  # on the causal LM whose forward install_loss_forward replaced: (loss, kernel)


# How many forwards are running whose rows are known to hold one sequence each (see one_sequence_per_row).
_ONE_SEQUENCE_PER_ROW = [0]


def _skip_packed_check() -> None:
    """Wrap transformers' masking_utils.find_packed_sequence_indices (once) so that it answers None without
    reading the device while one_sequence_per_row is active; elsewhere it is transformers' own."""
    try:
        from transformers import masking_utils
    except ImportError:
        return
    found = getattr(masking_utils, "find_packed_sequence_indices", None)
    if found is None or getattr(found, "_cllama", False):
        return

    def find_packed_sequence_indices(position_ids, _original=found):
        return None if _ONE_SEQUENCE_PER_ROW[0] else _original(position_ids)

    find_packed_sequence_indices._cllama = True  # type: ignore[attr-defined]
    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices


@contextlib.contextmanager
def one_sequence_per_row():
    """While active, transformers takes every row for one sequence without asking the device.

    Why: transformers (5.24) calls find_packed_sequence_indices in every decoder forward that has position ids
    (it makes them from the cache position when none are given) but no attention mask, and that function ends
    in ``(mask[:, -1] == 0).all()`` as a Python bool: a host synchronisation per micro-batch, stalling the
    GPU queue (docs/hazards.md#h18). Where the caller passed neither position ids nor a mask, the positions are
    0..T-1 in every row, for which that function returns None: the answer is known without the read. Rows with
    several examples or documents pass position ids or a mask (trainer/batches.py) and keep transformers' check.
    """
    _skip_packed_check()
    _ONE_SEQUENCE_PER_ROW[0] += 1
    try:
        yield
    finally:
        _ONE_SEQUENCE_PER_ROW[0] -= 1


def install_loss_forward(model: nn.Module, loss: str = "chunked", kernel: str = "torch") -> nn.Module:
    """Give ``model`` (a Hugging Face causal LM, or a PEFT model around one) a forward that, given ``labels``,
    computes their loss without building the (tokens x V') logits (``loss="chunked"``, model/loss.py), or as
    transformers does (``"hf"``, the reference); without labels it is the model's own forward (generation, chat
    and export are unchanged). Returns ``model``.

    With labels (aligned with input_ids, -100 ignored; the shift happens here, as in transformers) the output's
    ``.loss`` is, by ``loss_reduction``: "mean" (the default: transformers' loss, the mean NLL over the predicted
    positions), "sum" (their summed NLL) or "none" (per-token NLL (B, T-1), 0 where ignored); ``.logits`` is
    None on the chunked path. The decoder runs as its own module call, then the lm_head *module* is called with
    the labels, so ZeRO-3's hooks gather and release the head's weights around the loss and before its backward
    (model/vocab.py). A head that is neither a SplitLMHead nor a bias-free Linear (e.g. a PEFT wrapper around
    lm_head) takes the "hf" path. ``kernel``: the fused kernel for "mean" / "sum" (loss.resolve_kernel's
    answer: torch, liger or cce); per-token losses always use the pure-PyTorch path.
    """
    import functools
    import inspect
    import types

    import torch.nn.functional as F

    from .loss import split_linear_cross_entropy, split_linear_token_nll

    if loss not in ("chunked", "hf"):
        raise ValueError(f"unknown loss {loss!r}; expected chunked or hf")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(lm, "_cllama_original_forward", None) or lm.forward  # installing twice re-wraps the original
    signature = inspect.signature(original)

    def head_nll(hidden: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor | None:
        head = lm.get_output_embeddings()
        flat_h, flat_l = hidden.flatten(0, 1), labels.flatten()
        if isinstance(head, SplitLMHead):
            return head(flat_h, labels=flat_l, reduction=reduction, kernel=kernel)
        if type(head) is nn.Linear and head.bias is None:  # a stock model (cllama eval): one weight, no ZeRO
            if reduction == "none":
                return split_linear_token_nll(flat_h, [head.weight], flat_l)
            return split_linear_cross_entropy(flat_h, [head.weight], flat_l, backend=kernel)[0]  # type: ignore[arg-type]
        return None

    @functools.wraps(original)
    def forward(self, *args, labels: torch.Tensor | None = None, loss_reduction: str = "mean", **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be mean, sum or none; got {loss_reduction!r}")
        bound = signature.bind_partial(*args, **kwargs).arguments
        extra = bound.pop("kwargs", {})
        bound = {**bound, **extra}
        bound.pop("logits_to_keep", None)
        plain = all(bound.get(k) is None for k in ("position_ids", "attention_mask", "past_key_values"))
        with one_sequence_per_row() if plain else contextlib.nullcontext():
            return loss_forward(bound, labels, loss_reduction)

    def loss_forward(bound: dict, labels: torch.Tensor, loss_reduction: str):
        # labels[:, t + 1] is the target of position t; the last position predicts nothing.
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
        b, t = labels.shape
        if loss == "chunked" and (lm.get_output_embeddings() is not None):
            out = lm.model(**bound)
            nll = head_nll(out.last_hidden_state, shifted, "none" if loss_reduction == "none" else "sum")
            if nll is not None:
                if loss_reduction == "none":
                    value = nll.view(b, t)[:, :-1]
                elif loss_reduction == "sum":
                    value = nll
                else:  # transformers' mean: over predicted positions (0 / 0 = NaN, as there)
                    value = nll / (shifted != -100).sum()
                return CausalLMOutputWithPast(loss=value, logits=None)
        if loss_reduction == "mean":
            return original(**bound, labels=labels)
        logits = original(**bound).logits[:, :-1]
        targets = shifted[:, :-1]
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.clamp(min=0).flatten(), reduction="none")
        per_token = (per_token.view(targets.shape) * (targets != -100).to(per_token.dtype))
        # "sum": per row, then over rows, the order the trainer's instruction-tuning loss always summed in.
        return CausalLMOutputWithPast(loss=per_token if loss_reduction == "none" else per_token.sum(dim=1).sum(),
                                      logits=None)

    from transformers.modeling_outputs import CausalLMOutputWithPast

    lm._cllama_original_forward = original
    lm.forward = types.MethodType(forward, lm)
    setattr(lm, LOSS_MARK, (loss, kernel))
    return model


def installed_loss(model: nn.Module) -> tuple[str, str] | None:
    """(loss, kernel) of the causal LM inside ``model`` (a DeepSpeed engine, a PEFT model, the LM itself) when
    ``install_loss_forward`` gave it its forward; None otherwise (its forward knows no loss_reduction)."""
    m: nn.Module | None = model
    while m is not None:
        mark = m.__dict__.get(LOSS_MARK)
        if mark is not None:
            return mark
        m = next((m._modules[k] for k in ("module", "base_model", "model") if m._modules.get(k) is not None), None)
    return None


@dataclass
class Counts:
    total: int
    lora: int
    new_rows: int
    trainable: int
    embedding_trainable: int

    @property
    def share(self) -> float:
        return self.trainable / self.total

    def optimizer_bytes(self, mixed_precision: bool) -> int:
        # AdamW: exp_avg + exp_avg_sq in fp32, plus an fp32 master copy when the weights are bf16/fp16.
        return self.trainable * (12 if mixed_precision else 8)

    def as_dict(self, mixed_precision: bool) -> dict[str, Any]:
        return {"total": self.total, "lora": self.lora, "new_rows": self.new_rows, "trainable": self.trainable,
                "trainable_share": self.share, "optimizer_state_bytes": self.optimizer_bytes(mixed_precision)}


def count_parameters(model: nn.Module) -> Counts:
    total = lora = new_rows = trainable = emb = 0
    for name, p in model.named_parameters():
        n = int(getattr(p, "ds_numel", p.numel()))  # ds_numel: full size of a ZeRO-3-partitioned parameter
        total += n
        if "lora_" in name:
            lora += n
        if is_new_rows(name):
            new_rows += n
        if p.requires_grad:
            trainable += n
            if is_embedding_param(name):
                emb += n
    return Counts(total, lora, new_rows, trainable, emb)


def dry_run(cfg: ModelConfig, lora_cfg: LoraConfig, new_vocab: int | None = None) -> dict[str, Counts]:
    """Parameter counts of both embedding modes, on the meta device: no weights, no memory."""
    config = load_llama_config(cfg)
    orig = config.vocab_size
    new_vocab = new_vocab or orig
    out = {}
    from transformers import LlamaForCausalLM

    config._attn_implementation = "eager"
    for mode in ("new-rows", "full"):
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
            extend_vocab(model, orig, max(new_vocab, orig), "mean", train_base=mode == "full")
            config.vocab_size = orig  # extend_vocab updated the shared config object
            model = apply_lora(model, lora_cfg, mode, seed=0)
        out[mode] = count_parameters(model)
    return out
