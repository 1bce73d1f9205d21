"""Build the model that trains: a LLaMA base, its vocabulary extended, LoRA on the projections.

What trains (hazard H3): LoRA weights, plus the appended rows of embed_tokens and lm_head held as
their own parameters (``embeddings: new-rows``), or both whole matrices (``embeddings: full``, the
paper's choice). Everything else is frozen.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import UserError
from .vocab import SplitEmbedding, SplitLMHead, extend_vocab

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_llama_config(cfg: TrainConfig):
    from transformers import AutoConfig, LlamaConfig

    if cfg.model:
        try:
            config = AutoConfig.from_pretrained(cfg.model)
        except (OSError, ValueError) as exc:
            raise UserError(f"model {cfg.model} is not a Hugging Face model folder: {exc}") from None
    else:
        try:
            config = LlamaConfig(**{"tie_word_embeddings": False, **cfg.model_config})
        except (TypeError, ValueError) as exc:
            raise UserError(f"model_config is not a valid LlamaConfig: {exc}") from None
    if getattr(config, "tie_word_embeddings", False):
        raise UserError("the model ties embed_tokens and lm_head; LLaMA's are untied (hazard H4)")
    config.use_cache = False
    return config


def build_base(cfg: TrainConfig, config, dtype: torch.dtype, zero3_ds_config: dict | None):
    """The base model: loaded (partitioned as it loads under ZeRO-3) or built from config, seeded.

    Built from a config, the model is made whole on the CPU with the run's seed, so every rank and every
    world size gets the same weights (deepspeed.initialize partitions it afterwards). Returns the model
    and the HfDeepSpeedConfig that must stay alive while transformers loads under ZeRO-3.
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    keep_alive = None
    if cfg.model:
        if zero3_ds_config is not None:
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(zero3_ds_config)  # makes from_pretrained load into zero.Init
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, attn_implementation=cfg.attn_implementation)
    else:
        config._attn_implementation = cfg.attn_implementation
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config).to(dtype)
    return model, keep_alive


def apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_targets), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed + 1)  # identical LoRA initialisation on every rank and world size
    try:
        # autocast_adapter_dtype=False: LoRA weights take the base dtype; DeepSpeed asserts on mixed dtypes
        # and keeps fp32 master copies itself.
        model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    except ValueError as exc:
        raise UserError(f"LoRA could not be applied (lora_targets {cfg.lora_targets}): {exc}") from None
    # PEFT froze everything but LoRA; the vocabulary's trainable parts train too.
    for module in model.modules():
        if isinstance(module, (SplitEmbedding, SplitLMHead)):
            module.weight_new.requires_grad_(True)
            module.weight_base.requires_grad_(cfg.embeddings == "full")
    return model


def build_model(cfg: TrainConfig, orig_vocab: int, new_vocab: int, dtype: torch.dtype,
                zero3_ds_config: dict | None = None, subword_ids=None):
    """Base + extended vocabulary + LoRA + gradient checkpointing. Returns (model, keep_alive)."""
    config = load_llama_config(cfg)
    if config.vocab_size != orig_vocab:
        raise UserError(f"vocabulary mismatch: the base model has {config.vocab_size:,} rows, the merged "
                        f"tokenizer's base had {orig_vocab:,} pieces (wrong base model or tokenizer?)")
    model, keep_alive = build_base(cfg, config, dtype, zero3_ds_config)
    extend_vocab(model, orig_vocab, new_vocab, cfg.new_row_init, cfg.new_row_std, subword_ids, cfg.seed,
                 train_base=cfg.embeddings == "full")
    if cfg.gradient_checkpointing:
        # Non-reentrant: the reentrant variant loses gradients when the inputs of a checkpointed block do
        # not require grad, which is the case with a frozen base (hazard H9).
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_lora(model, cfg)
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
        n = int(getattr(p, "ds_numel", p.numel()))  # ds_numel: full size of a partitioned parameter (H1)
        total += n
        if "lora_" in name:
            lora += n
        if name.endswith("weight_new"):
            new_rows += n
        if p.requires_grad:
            trainable += n
            if "weight_new" in name or "weight_base" in name:
                emb += n
    return Counts(total, lora, new_rows, trainable, emb)


def dry_run(cfg: TrainConfig, new_vocab: int | None = None) -> dict[str, Counts]:
    """Parameter counts of both embedding modes, on the meta device: no weights, no memory."""
    import dataclasses

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
            model = apply_lora(model, dataclasses.replace(cfg, embeddings=mode))
        out[mode] = count_parameters(model)
    return out
