"""Build the model that trains: a LLaMA base, its vocabulary extended, LoRA on the projections.

What trains: LoRA weights, plus the appended rows of embed_tokens and lm_head held as their own
parameters (``model.embeddings: new-rows``), or both whole matrices (``full``, the paper's choice).
Everything else is frozen, structurally (model/vocab.py says why a gradient mask would not do).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    if getattr(config, "tie_word_embeddings", False):
        raise UserError("the model ties embed_tokens and lm_head; LLaMA's are untied, and the new rows must be "
                        "appended to both matrices")
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


def build_model(cfg: ModelConfig, lora_cfg: LoraConfig, seed: int, orig_vocab: int, new_vocab: int,
                dtype: torch.dtype, zero3_ds_config: dict | None = None, subword_ids=None,
                packed_rows: bool = False):
    """Base + extended vocabulary + LoRA + gradient checkpointing. Returns (model, keep_alive)."""
    config = load_llama_config(cfg)
    extended = config.vocab_size == new_vocab != orig_vocab  # a merged pre-trained model (instruction tuning)
    if config.vocab_size != orig_vocab and not extended:
        raise UserError(f"vocabulary mismatch: the base model has {config.vocab_size:,} rows, the merged "
                        f"tokenizer has {new_vocab:,} pieces over a base of {orig_vocab:,} (wrong base model or "
                        "tokenizer?)")
    model, keep_alive = build_base(cfg, config, dtype, zero3_ds_config, seed, packed_rows)
    if extended:
        split_vocab(model, orig_vocab, new_vocab, train_base=cfg.embeddings == "full")
    else:
        extend_vocab(model, orig_vocab, new_vocab, cfg.new_row_init, cfg.new_row_std, subword_ids, seed,
                     train_base=cfg.embeddings == "full")
    if cfg.gradient_checkpointing:
        # Non-reentrant: the reentrant variant loses gradients when the inputs of a checkpointed block do
        # not require grad, which is the case with a frozen base (PEFT #1142: "element 0 of tensors does
        # not require grad").
        enable_checkpointing(model, cfg.checkpoint_scope)
    model = apply_lora(model, lora_cfg, cfg.embeddings, seed)
    return model, keep_alive


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
            extend_vocab(model, orig, new_vocab, "mean", train_base=mode == "full")
            config.vocab_size = orig  # extend_vocab updated the shared config object
            model = apply_lora(model, lora_cfg, mode, seed=0)
        out[mode] = count_parameters(model)
    return out
