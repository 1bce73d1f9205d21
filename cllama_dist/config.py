"""Typed, validated configuration for every stage.

Each stage has one dataclass. Every field carries its documentation in ``metadata["help"]``; the same
text becomes the command-line help, so a flag and its YAML key never drift apart. ``__post_init__``
checks values at start-up, not at step 1000.

A config can be loaded from YAML (``load_config``) and overridden by command-line flags
(``add_arguments`` / ``from_args``); the resolved config is written next to the stage's outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UserError


def doc(help: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# --------------------------------------------------------------------------------------------------
# Corpus reading, shared by the tokenizer trainer, the report and the preprocessor.


@dataclass
class CorpusConfig:
    inputs: list[str] = doc(
        "Corpus files, folders (searched recursively) or glob patterns: .txt (a line a document), "
        ".jsonl (a JSON object a line), .parquet; each optionally .gz or .zst.",
        default=[],
        aliases=["--corpus", "--input"],
    )
    text_field: str = doc("Name of the text field in .jsonl objects and the text column in .parquet files.", "text")
    strict: bool = doc(
        "Fail on the first bad record (invalid UTF-8, malformed JSON, missing text field), naming file "
        "and line, instead of skipping and counting it.",
        False,
    )

    def __post_init__(self) -> None:
        if not self.text_field:
            raise UserError("text_field must not be empty")


# --------------------------------------------------------------------------------------------------
# Vocabulary stage.


@dataclass
class TokenizerTrainConfig(CorpusConfig):
    output: str = doc(
        "Output prefix: writes PREFIX.model, PREFIX.vocab and PREFIX.report.json.", "chinese_sp",
        aliases=["--out", "--model-prefix"],
    )
    vocab_size: int = doc("Number of pieces of the new tokenizer (the paper: 20,000).", 20000)
    model_type: Literal["bpe", "unigram"] = doc(
        "SentencePiece algorithm. The paper's released chinese_sp.model is unigram; BPE is the default "
        "because the merged tokenizer runs LLaMA's BPE algorithm, under which unigram-trained pieces are "
        "often unreachable (measured on the fixture corpus: 2,315 of 18,507 added unigram pieces "
        "against 12 of 18,466 BPE pieces), and BPE compresses held-out text slightly better.",
        "bpe",
    )
    character_coverage: float = doc("Share of characters covered by the vocabulary (the paper: 0.9995).", 0.9995)
    normalization: str = doc(
        "SentencePiece normalization rule. 'identity' (LLaMA's) by default: the merged tokenizer keeps the "
        "base's normalizer, so pieces learned under another rule may never match real text (the paper's "
        "model used nmt_nfkc, which learns ',' where Chinese text has '，').",
        "identity",
    )
    split_digits: bool = doc(
        "Split numbers into single digits, as LLaMA does. Off in the paper's model, whose multi-digit "
        "pieces then break LLaMA's digit convention after the merge (hazard H12).",
        False,
    )
    sample_sentences: int = doc(
        "Size of the seeded reservoir sample of sentences fed to SentencePiece. Memory is bounded by "
        "this and max_sentence_chars, never by the corpus size.",
        2_000_000,
    )
    max_sentence_chars: int = doc(
        "Longer lines are cut at sentence punctuation, then hard, to at most this many characters.", 1000
    )
    threads: int = doc("SentencePiece training threads (0: all cores).", 0)
    seed: int = doc("Seed of the sentence sample and of SentencePiece's random generator.", 42)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size < 10:
            raise UserError(f"vocab_size must be at least 10, got {self.vocab_size}")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise UserError(f"character_coverage must be within [0.9, 1.0], got {self.character_coverage}")
        if self.sample_sentences < 1:
            raise UserError(f"sample_sentences must be positive, got {self.sample_sentences}")
        if self.max_sentence_chars < 16:
            raise UserError(f"max_sentence_chars must be at least 16, got {self.max_sentence_chars}")
        if self.threads < 0:
            raise UserError(f"threads must be >= 0, got {self.threads}")


@dataclass
class MergeConfig:
    base: str = doc("The base SentencePiece model (LLaMA's tokenizer.model), or a folder holding tokenizer.model.", "")
    add: str = doc("The SentencePiece model whose pieces are added (e.g. the 20K Chinese model).", "")
    out: str = doc("Output folder: tokenizer.model, Hugging Face tokenizer files, merge_report.json.", "")
    new_piece_score: Literal["paper", "below-base"] = doc(
        "Score of appended pieces. 'paper': 0, as the paper's script did (above every BPE piece of "
        "LLaMA, so BPE merges them first). 'below-base': decreasing scores under the lowest base "
        "score, so base merges win ties; gives different encodings from the published tokenizer.",
        "paper",
    )
    drop_multi_digit: bool = doc(
        "Do not add pieces containing two or more consecutive digits, keeping LLaMA's one-digit "
        "convention (hazard H12). Off by default: the published tokenizer keeps them.",
        False,
    )
    overwrite: bool = doc("Replace an existing output folder.", False)

    def __post_init__(self) -> None:
        for name in ("base", "add", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")


@dataclass
class ReportConfig(CorpusConfig):
    tokenizers: list[str] = doc(
        "Tokenizers to compare (SentencePiece .model files or folders holding tokenizer.model); the "
        "first is the reference for ratios, and a later one whose first pieces equal it is analysed "
        "as its extension.",
        default=[],
        aliases=["--tokenizer"],
    )
    json_out: str = doc("Write the figures as JSON to this path.", "")
    threads: int = doc("Encoding threads (0: all cores).", 0)
    max_documents: int = doc("Stop after this many documents (0: all).", 0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tokenizers:
            raise UserError("give at least one --tokenizers")
        if not self.inputs:
            raise UserError("give the corpus with --inputs")


# --------------------------------------------------------------------------------------------------
# Evaluation.

DEFAULT_PROMPTS = ["中国的首都是", "人工智能是", "从前有一座山，山里有"]


@dataclass
class EvalConfig(CorpusConfig):
    model: str = doc("The model: a Hugging Face folder (a base model, or a merged one from `cllama export merged`).", "")
    adapter: str = doc(
        "An adapter folder from `cllama export adapter`, loaded with stock PEFT on top of --model (the base it "
        "was trained from, resized to the adapter's tokenizer).", "")
    tokenizer: str = doc(
        "Tokenizer folder or .model (default: the adapter's, else the model folder's). Must be the one the "
        "model was trained with.", "")
    shards: str = doc(
        "Evaluate on a shard folder from `cllama preprocess` instead of text (loss and perplexity only: "
        "shards hold tokens, so bits per character need --inputs text).", "")
    split: Literal["validation", "train"] = doc("Which split of --shards.", "validation")
    block_size: int = doc(
        "Window length in tokens. Text longer than a window is cut into consecutive windows that predict "
        "every token exactly once (capped at the model's max_position_embeddings).", 1024)
    batch_size: int = doc("Windows per forward pass.", 4)
    max_documents: int = doc("Stop after this many documents (text) or blocks (shards); 0: all.", 0)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = doc("Weights dtype; auto: bf16 on a GPU, fp32 on the CPU.", "auto")
    device: str = doc("auto, cpu, cuda or cuda:N.", "auto")
    generate: bool = doc("Also sample continuations of --prompts and report generation speed (tokens/s).", False)
    prompts: list[str] = doc("Prompts for --generate.", DEFAULT_PROMPTS, aliases=["--prompt"])
    max_new_tokens: int = doc("Tokens generated per prompt.", 48)
    temperature: float = doc("Sampling temperature for --generate; 0: greedy.", 0.7)
    top_p: float = doc("Nucleus sampling threshold for --generate.", 0.9)
    seed: int = doc("Seed of the sampling.", 0)
    json_out: str = doc("Write the figures (and generations) as JSON to this path.", "")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise UserError("--model is required (a Hugging Face model folder)")
        if bool(self.inputs) == bool(self.shards):
            raise UserError("give either --inputs (text: bits per character) or --shards (tokens), not both or neither")
        if self.block_size < 2:
            raise UserError(f"block_size must be at least 2, got {self.block_size}")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise UserError("batch_size and max_new_tokens must be positive")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"temperature must be >= 0 and top_p within (0, 1]; got {self.temperature}, {self.top_p}")


# --------------------------------------------------------------------------------------------------
# Offline preprocessing.


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


@dataclass
class PreprocessConfig(CorpusConfig):
    tokenizer: str = doc("The merged tokenizer folder (holding tokenizer.model) or a SentencePiece .model file.", "")
    output: str = doc("Output folder for the Arrow shards and manifest.json.", "", aliases=["--out"])
    block_size: int = doc("Tokens per training sequence; documents are packed across boundaries.", 512)
    add_bos: bool = doc("Put BOS before every document (the paper's v1 and v2).", True)
    add_eos: bool = doc("Put EOS after every document (the paper's v2).", False)
    validation_fraction: float = doc(
        "Share of documents sent to the validation split, chosen by a keyed hash of each document's text "
        "(so the same document always lands in the same split, whatever the order or the task split).",
        0.01,
    )
    seed: int = doc("Key of the split hash.", 0)
    shard_size_mb: float = doc(
        "Target size of one train shard, in MB of output; shard boundaries are planned from input sizes, "
        "so they do not depend on workers or tasks.",
        256.0,
    )
    chunk_mb: float = doc(
        "Input bytes one worker tokenizes at a time (plain .txt/.jsonl are cut by byte range; a compressed "
        "file is one chunk, streamed). Bounds memory per worker together with batch_docs.",
        16.0,
    )
    batch_docs: int = doc("Documents encoded per SentencePiece call inside a worker.", 1000)
    workers: int = doc("Worker processes (0: all cores).", 0)
    num_tasks: int = doc("Number of tasks sharing the input (default: SLURM_ARRAY_TASK_COUNT or 1).", 0)
    task_id: int = doc("This task's index, 0-based (default: SLURM_ARRAY_TASK_ID or 0).", -1)
    record_boundaries: bool = doc(
        "Also store, per sequence, the offsets where a document starts (column doc_starts), so that a "
        "trainer can mask attention across documents.",
        False,
    )
    max_doc_chars: int = doc("Skip (and count) documents longer than this many characters (0: no limit).", 10_000_000)
    overwrite: bool = doc("Delete an existing output folder made with other settings instead of refusing.", False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.tokenizer:
            raise UserError("--tokenizer is required (the merged tokenizer folder)")
        if not self.output:
            raise UserError("--output is required")
        if self.block_size < 2:
            raise UserError(f"block_size must be at least 2, got {self.block_size}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise UserError(f"validation_fraction must be within [0, 1), got {self.validation_fraction}")
        if self.shard_size_mb <= 0 or self.chunk_mb <= 0:
            raise UserError("shard_size_mb and chunk_mb must be positive")
        if self.num_tasks <= 0:
            self.num_tasks = _env_int("SLURM_ARRAY_TASK_COUNT", 1)
        if self.task_id < 0:
            self.task_id = _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
        if not 0 <= self.task_id < self.num_tasks:
            raise UserError(f"task_id {self.task_id} is outside 0..{self.num_tasks - 1} (num_tasks {self.num_tasks})")
        if self.workers < 0:
            raise UserError(f"workers must be >= 0, got {self.workers}")


# --------------------------------------------------------------------------------------------------
# Training.

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainConfig:
    # What to train on.
    model: str = doc(
        "Base model: a Hugging Face folder (config.json + weights). Leave empty and set model_config to "
        "build a LLaMA-architecture model with random weights (tests, demo, benchmarks, dry runs).", "")
    model_config: dict = doc(
        "LlamaConfig fields (hidden_size, num_hidden_layers, ..., vocab_size = the base vocabulary) for a "
        "model built from scratch; YAML only. Ignored when model is set.", {})
    tokenizer: str = doc("The merged tokenizer folder (from `cllama tokenizer merge`).", "")
    data: str = doc("The preprocessor's output folder (Arrow shards + manifest.json).", "")
    output_dir: str = doc("Run folder: resolved config, metrics, TensorBoard events, checkpoints.", "",
                          aliases=["--out"])
    extended_vocab: int = doc(
        "Expected size of the extended vocabulary, len(tokenizer) (the paper: 49,953). With a tokenizer it "
        "is a check; without one (dry runs) it is the size used. 0: take len(tokenizer).", 0)
    block_size: int = doc("Sequence length; must equal the shards' block size (0: take it from the manifest).", 0)
    # Vocabulary extension.
    embeddings: Literal["new-rows", "full"] = doc(
        "What of embed_tokens and lm_head trains. new-rows: only the appended rows, held as their own "
        "parameters (old rows bit-identical, optimizer state for new rows only). full: both whole matrices, "
        "the paper's choice, for comparison.", "new-rows")
    new_row_init: Literal["mean", "subword", "normal"] = doc(
        "Initial value of appended rows: mean of the old rows; subword = mean of the base rows of the pieces "
        "the base tokenizer splits the new piece into (needs the base tokenizer named in the merge report); "
        "normal = N(0, new_row_std), the paper's.", "mean")
    new_row_std: float = doc("Standard deviation of the normal initialisation.", 0.02)
    # LoRA.
    lora_rank: int = doc("LoRA rank (the paper: 8; its v2: 64).", 8)
    lora_alpha: float = doc("LoRA alpha (the paper: 32; its v2: 128).", 32.0)
    lora_dropout: float = doc("LoRA dropout (the paper: 0.05).", 0.05)
    lora_targets: list[str] = doc("Modules that get LoRA adapters.", LORA_TARGETS)
    # Optimisation.
    micro_batch_size: int = doc("Sequences per process per forward pass.", 1)
    grad_accum: int = doc("Gradient accumulation steps (ignored when global_batch_size is set).", 1)
    global_batch_size: int = doc(
        "Sequences per optimizer step over all processes; fixes grad_accum = global / (micro x processes), "
        "so the same run resumes on another number of processes with the same batches (0: use grad_accum).", 0)
    max_steps: int = doc("Optimizer steps to train (0: one pass over the train split).", 0)
    lr: float = doc("Peak learning rate of LoRA weights (the paper: 2e-4).", 2e-4)
    embedding_lr: float = doc("Peak learning rate of the embedding rows (0: same as lr).", 0.0)
    weight_decay: float = doc("AdamW weight decay on LoRA weights; never applied to embedding rows.", 0.0)
    adam_betas: list[float] = doc("AdamW betas.", [0.9, 0.95])
    adam_eps: float = doc("AdamW epsilon.", 1e-8)
    warmup_steps: int = doc("Linear warm-up steps.", 0)
    warmup_ratio: float = doc("Warm-up as a share of max_steps (used when warmup_steps is 0).", 0.05)
    min_lr_ratio: float = doc("Cosine decay ends at this share of the peak learning rate.", 0.1)
    clip_grad: float = doc("Gradient norm clipping (0: off).", 1.0)
    # Engine.
    deepspeed_config: str = doc(
        "DeepSpeed JSON (deepspeed_configs/zero3.json, zero3_offload.json, zero2.json); its \"auto\" "
        "values are filled from this config.", "deepspeed_configs/zero3.json", aliases=["--ds-config"])
    deepspeed_overrides: dict = doc(
        "Settings merged into the DeepSpeed JSON (nested mappings merge key by key); YAML only. The tiny "
        "CPU configs set zero_optimization.stage3_param_persistence_threshold: 0 so that tiny weights are "
        "partitioned too.", {})
    single_process_zero2: bool = doc(
        "With one process, run a ZeRO-3 config as ZeRO-2: a single process's one partition is the whole model, "
        "so ZeRO-3 saves no memory there but still gathers and releases every layer's weights in each forward, "
        "backward and recomputation (tiny model on the CPU: 2-6x the steps/s; on a GPU: to be measured by "
        "bench/train_throughput.py). Off by default until the GPU numbers justify it. A checkpoint resumes "
        "only under the ZeRO stage it was saved with.", False)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = doc(
        "Compute dtype: auto = bf16 on GPU, fp32 on CPU. LoRA weights and new rows keep fp32 masters.", "auto")
    gradient_checkpointing: bool = doc("Recompute activations in the backward pass (non-reentrant).", True)
    attn_implementation: str = doc("transformers attention kernel: sdpa, eager, flash_attention_2.", "sdpa")
    # Evaluation, logging, checkpoints.
    eval_every: int = doc("Evaluate on the validation split every N steps (0: only at the end).", 0)
    eval_sequences: int = doc(
        "Evaluate on the first N validation sequences (0: the whole split); the same N sequences whatever the "
        "number of processes.", 0)
    log_every: int = doc("Log metrics every N steps.", 10)
    save_every: int = doc("Save a checkpoint every N steps (0: only at the end and on a signal).", 0)
    keep_last: int = doc("Complete checkpoints to keep (older ones are deleted).", 2)
    resume: str = doc("'auto' (the newest complete checkpoint in the run folder, if any), a checkpoint "
                      "folder, or '' to start fresh (refused if the run folder already has checkpoints).", "auto")
    max_nonfinite_steps: int = doc(
        "Stop after this many steps in a row with a non-finite loss (each is skipped), saving the last "
        "good state.", 3)
    peak_tflops: float = doc("Peak dense TFLOP/s of one device for MFU (0: known GPUs by name, else no MFU).", 0.0)
    tensorboard: bool = doc("Write TensorBoard events to OUTPUT_DIR/tb.", True)
    seed: int = doc("Seed of the data order, the new-row initialisation and LoRA initialisation.", 0)
    fault_nonfinite_steps: list[int] = doc(
        "Testing aid: steps (numbered from 1, as logged) whose last micro-batch loss is replaced by NaN, to "
        "exercise the non-finite handling.", [])

    def __post_init__(self) -> None:
        if not self.model and not self.model_config:
            raise UserError("set model (a Hugging Face folder) or model_config (to build one from a config)")
        for name in ("micro_batch_size", "grad_accum", "lora_rank", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("extended_vocab", "block_size", "max_steps", "global_batch_size", "eval_every", "save_every", "warmup_steps",
                     "eval_sequences", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.embedding_lr < 0:
            raise UserError("lr must be positive and embedding_lr non-negative")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]")
        if len(self.adam_betas) != 2:
            raise UserError(f"adam_betas needs two values, got {self.adam_betas}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets:
            raise UserError("lora_targets must name at least one module")


# --------------------------------------------------------------------------------------------------
# Generic glue: dataclass <-> argparse <-> YAML.


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per dataclass field. Defaults are left as None so that YAML values survive."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f"{help_text} (default: {default!r})"}
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif origin is list:
            # Repeatable and multi-valued: `--tokenizer A --tokenizer B` and `--tokenizers A B` both work.
            kwargs["nargs"] = "+"
            kwargs["action"] = "extend"
            kwargs["type"] = typing.get_args(tp)[0]
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:  # nested dataclasses and mappings come from YAML only
            continue
        parser.add_argument(_flag(f.name), *f.metadata.get("aliases", ()), **kwargs)


def build(cls: type, values: dict[str, Any]) -> Any:
    """Build a dataclass from a mapping, refusing unknown keys with the list of known ones."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown {cls.__name__} setting(s) {unknown}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        tp = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = build(tp, value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required field
        raise UserError(f"{cls.__name__}: {exc}") from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping at the top level")
    return data


def from_args(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """YAML values (``base``) overridden by every flag the user actually gave."""
    values = dict(base or {})
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return build(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
