"""The stage API: one plain function per stage, each taking its config object.

    from cllama_dist import stages
    from cllama_dist.tokenizer.config import MergeConfig
    stages.merge(MergeConfig(base="llama/tokenizer.model", add="zh.model", out="merged/"))

The CLI (cli.py) only parses flags and YAML into these config objects and calls these functions; the
submitit launcher pickles the config objects and calls them in the job; the demo recipe (recipes/demo/,
a layer above this one: ``cllama demo`` calls it directly) calls them in order. Each function imports its
implementation when called, so importing this module (and starting the CLI) imports nothing heavy: the
offline stages never import torch.
"""

from __future__ import annotations

from .bases.config import BaseFetchConfig
from .chat_config import ChatConfig
from .data.config import FinalizeConfig, PreprocessConfig, SFTPreprocessConfig
from .eval.config import EvalConfig
from .export.config import ExportAdapterConfig, ExportMergedConfig
from .tokenizer.config import MergeConfig, ReportConfig, TokenizerTrainConfig
from .trainer.config import TrainConfig

# ------------------------------------------------------------------------------ pretrained bases


def base_fetch(cfg: BaseFetchConfig) -> dict:
    """Fetch and convert a pretrained base into a Hugging Face folder once (later calls verify and reuse it)."""
    from .bases.convert import fetch_base

    return fetch_base(cfg)


# ------------------------------------------------------------------------------ the vocabulary stage


def tokenizer_train(cfg: TokenizerTrainConfig) -> dict:
    """Train a SentencePiece model; returns its report (also written as PREFIX.report.json)."""
    from .tokenizer.train import train

    return train(cfg)


def merge(cfg: MergeConfig) -> dict:
    """Merge by union into the base tokenizer, base ids unchanged; returns the merge report."""
    from .tokenizer.merge import merge as merge_tokenizers

    return merge_tokenizers(cfg)


def report(cfg: ReportConfig) -> dict:
    """Tokens per character, byte-fallback share and extension figures of tokenizers on a corpus."""
    from .tokenizer.report import report as report_tokenizers

    return report_tokenizers(cfg)


# ------------------------------------------------------------------------------ offline preprocessing


def preprocess_prepare(cfg: PreprocessConfig) -> dict:
    """Check the settings and write the output folder's plan, before an array of tasks starts."""
    from .data.preprocess import prepare

    return prepare(cfg)


def preprocess_task(cfg: PreprocessConfig) -> dict:
    """Tokenize this task's share of the corpus (``task_id`` of ``num_tasks``, or Slurm's array variables)."""
    from .data.preprocess import run_task

    return run_task(cfg)


def preprocess_finalize(cfg: FinalizeConfig) -> dict:
    """Join every task's output into manifest.json; returns the manifest."""
    from .data.preprocess import finalize

    return finalize(cfg.output, verify=cfg.verify)


def preprocess(cfg: PreprocessConfig) -> dict | None:
    """This task, then finalize when it is the only one; returns the manifest, or None for one of several tasks."""
    from .data.preprocess import preprocess as run

    return run(cfg)


def preprocess_sft_prepare(cfg: SFTPreprocessConfig) -> dict:
    """Instruction data: check the settings, tokenizer, template and inputs, and write the output folder's plan."""
    from .data.sft import prepare

    return prepare(cfg)


def preprocess_sft_task(cfg: SFTPreprocessConfig) -> dict:
    """Instruction data: render and encode this task's share into shards (``task_id`` of ``num_tasks``)."""
    from .data.sft import run_task

    return run_task(cfg)


def preprocess_sft_finalize(cfg: FinalizeConfig) -> dict:
    """Instruction data: join every task's output into manifest.json; returns the manifest."""
    from .data.sft import finalize

    return finalize(cfg.output, verify=cfg.verify)


def preprocess_sft(cfg: SFTPreprocessConfig) -> dict | None:
    """Instruction data: this task, then finalize when it is the only one; the manifest, or None for one of
    several tasks."""
    from .data.sft import preprocess_sft as run

    return run(cfg)


# ------------------------------------------------------------------------------ training


def train(cfg: TrainConfig) -> int:
    """Run this process's part of a training job (launched by torchrun / deepspeed / srun, or alone); returns
    the exit status: 0 done, 3 stopped by a signal after saving, 4 stopped on non-finite losses."""
    from .trainer.loop import train as run

    return run(cfg)


def dry_run(cfg: TrainConfig) -> dict:
    """Parameter counts, optimizer state and FLOPs per token of both embedding modes, on the meta device."""
    from .model.adapters import dry_run as count
    from .model.adapters import load_llama_config
    from .model.flops import run_flops

    from .errors import UserError

    config = load_llama_config(cfg.model)
    new_vocab = cfg.model.extended_vocab
    if cfg.model.tokenizer:  # the same checks as a real run: a mismatched tokenizer is refused here too
        from .tokenizer.merged import read_merged

        vocab = read_merged(cfg.model.tokenizer, config.vocab_size, cfg.model.extended_vocab)
        # Rows, not tokens: a base may hold padding rows beyond its tokenizer (reused first), never fewer rows.
        if vocab.orig_vocab > config.vocab_size:
            raise UserError(f"vocabulary mismatch: the model has {config.vocab_size:,} rows, the merged tokenizer "
                            f"{cfg.model.tokenizer} extends a base of {vocab.orig_vocab:,} pieces")
        new_vocab = max(vocab.new_vocab, config.vocab_size)
    new_vocab = new_vocab or config.vocab_size
    if new_vocab < config.vocab_size:
        raise UserError(f"model.extended_vocab {new_vocab:,} is smaller than the model's {config.vocab_size:,} rows")
    block = cfg.data.block_size or 512
    modes = {}
    for mode, c in count(cfg.model, cfg.lora, new_vocab).items():
        f = run_flops(config, config.vocab_size, new_vocab, mode, block, c.lora, cfg.model.gradient_checkpointing)
        modes[mode] = {"counts": c, "flops": f}
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "orig_vocab": config.vocab_size,
            "new_vocab": new_vocab, "block": block, "mixed_precision": cfg.engine.dtype != "fp32", "modes": modes,
            "lora": f"LoRA r {cfg.lora.rank} on {', '.join(cfg.lora.targets)}"}


# ------------------------------------------------------------------------------ export and evaluation


def export_adapter(cfg: ExportAdapterConfig) -> dict:
    """A PEFT adapter (LoRA + new rows) from the run's newest complete checkpoint (or ``cfg.step``)."""
    from .export.run import export_adapter as export

    return export(cfg.run, cfg.out, cfg.step or None, overwrite=cfg.overwrite, template=cfg.template)


def export_merged(cfg: ExportMergedConfig) -> dict:
    """Base + adapter merged into a stock Hugging Face model, one weight shard at a time."""
    from .export.run import export_merged as export

    return export(cfg.base, cfg.adapter, cfg.out, cfg.dtype, overwrite=cfg.overwrite)


def evaluate(cfg: EvalConfig) -> dict:
    """Loss, perplexity and bits per character (text) of a model, with optional generation (raw continuation or
    through the chat template) and the exact-match share of held-out instructions (``cfg.instructions``)."""
    from .eval.run import evaluate as run

    return run(cfg)


def chat(cfg: ChatConfig) -> dict:
    """A chat through the model's template: interactive, or scripted by ``cfg.message``; returns the transcript."""
    from .chat import chat as run

    return run(cfg)
