"""Settings of the data stages: corpus reading, offline preprocessing, and the trainer's data section."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, PathStr, Section, check, option


@dataclass
class CorpusConfig(Section):
    """Corpus reading, shared by the tokenizer trainer, the report, the preprocessor and eval."""

    inputs: list[PathStr] = option(
        [], "Corpus files, folders (searched recursively) or glob patterns: .txt (a line a document), "
            ".jsonl (a JSON object a line), .parquet; each optionally .gz or .zst.",
        aliases=["--corpus", "--input"])
    text_field: str = option("text", "Name of the text field in .jsonl objects and the text column in .parquet files.")
    strict: bool = option(
        False, "Fail on the first bad record (invalid UTF-8, malformed JSON, missing text field), naming file "
               "and line, instead of skipping and counting it.")

    def validate(self) -> None:
        check(bool(self.text_field), "text_field", "must not be empty")


@dataclass
class PreprocessConfig(CorpusConfig):
    """Offline preprocessing: a corpus into packed Arrow shards (cllama preprocess)."""

    tokenizer: PathStr = option("", "The merged tokenizer folder (holding tokenizer.model) or a SentencePiece .model file.")
    output: PathStr = option("", "Output folder for the Arrow shards and manifest.json.", aliases=["--out"])
    block_size: int = option(512, "Tokens per training sequence; documents are packed across boundaries.")
    add_bos: bool = option(True, "Put BOS before every document (the paper's v1 and v2).")
    add_eos: bool = option(False, "Put EOS after every document (the paper's v2).")
    validation_fraction: float = option(
        0.01, "Share of documents sent to the validation split, chosen by a keyed hash of each document's text "
              "(so the same document always lands in the same split, whatever the order or the task split).")
    seed: int = option(0, "Key of the split hash.")
    shard_size_mb: float = option(
        256.0, "Target size of one train shard, in MB of output; shard boundaries are planned from input sizes, "
               "so they do not depend on workers or tasks.")
    chunk_mb: float = option(
        16.0, "Input bytes one worker tokenizes at a time (plain .txt/.jsonl are cut by byte range; a compressed "
              "file is one chunk, streamed). Bounds memory per worker together with batch_docs.")
    batch_docs: int = option(1000, "Documents encoded per SentencePiece call inside a worker.")
    workers: int = option(0, "Worker processes (0: all cores).")
    num_tasks: int = option(0, "Number of tasks sharing the input (0: SLURM_ARRAY_TASK_COUNT, else 1).")
    task_id: int = option(-1, "This task's index, 0-based (-1: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, else 0).")
    record_boundaries: bool = option(
        False, "Also store, per sequence, the offsets where a document starts (column doc_starts), so that a "
               "trainer can mask attention across documents.")
    max_doc_chars: int = option(10_000_000, "Skip (and count) documents longer than this many characters (0: no limit).")
    overwrite: bool = option(False, "Delete an existing output folder made with other settings instead of refusing.")

    def validate(self) -> None:
        super().validate()
        check(bool(self.tokenizer), "tokenizer", "is required (the merged tokenizer folder)")
        check(bool(self.output), "output", "is required (the shards folder to write)")
        check(self.block_size >= 2, "block_size", f"must be at least 2, got {self.block_size}")
        check(0.0 <= self.validation_fraction < 1.0, "validation_fraction",
              f"must be within [0, 1), got {self.validation_fraction}")
        check(self.shard_size_mb > 0, "shard_size_mb", f"must be positive, got {self.shard_size_mb}")
        check(self.chunk_mb > 0, "chunk_mb", f"must be positive, got {self.chunk_mb}")
        check(self.batch_docs >= 1, "batch_docs", f"must be at least 1, got {self.batch_docs}")
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(self.num_tasks >= 0, "num_tasks", f"must be >= 0, got {self.num_tasks}")
        check(self.max_doc_chars >= 0, "max_doc_chars", f"must be >= 0, got {self.max_doc_chars}")
        if self.num_tasks and self.task_id >= 0:
            check(self.task_id < self.num_tasks, "task_id",
                  f"{self.task_id} is outside 0..{self.num_tasks - 1} (num_tasks {self.num_tasks})")


MIN_SFT_LENGTH = 16  # below this no template's prompt leaves room for a response


@dataclass
class SFTPreprocessConfig(Section):
    """Offline preprocessing of instruction data: rendered through a chat template, tokenized, into Arrow shards
    with a loss mask over the responses (cllama preprocess-sft)."""

    inputs: list[PathStr] = option(
        [], "Instruction files, folders (searched recursively) or glob patterns: Alpaca-style records as JSON Lines "
            "or one JSON array (.jsonl / .json), chat records ({\"messages\": [...]}) as JSON Lines; each "
            "optionally .gz or .zst.", aliases=["--input", "--data"])
    tokenizer: PathStr = option("", "The merged tokenizer folder (holding tokenizer.model) or its SentencePiece "
                                    ".model file.")
    template: str = option(
        "alpaca", "Chat template: alpaca (the paper's v1 prompt), llama2 (v2, [INST] <<SYS>>), tokenizer (the "
                  "tokenizer folder's own chat_template), or a Jinja file (.jinja).")
    output: PathStr = option("", "Output folder for the Arrow shards and manifest.json.", aliases=["--out"])
    format: Literal["auto", "alpaca", "chat"] = option(
        "auto", "Record format: alpaca (instruction / input / output), chat (messages), or auto (per record: an "
                "object with the messages key is chat, any other Alpaca).")
    instruction_field: str = option("instruction", "Alpaca records: the instruction field.")
    input_field: str = option("input", "Alpaca records: the optional input field, appended to the instruction after "
                                       "a newline when not empty (empty: no input field).")
    output_field: str = option("output", "Alpaca records: the response field.")
    system_field: str = option("", "Alpaca records: an optional per-record system prompt field (empty: none).")
    messages_key: str = option("messages", "Chat records: the field holding the list of {role, content} messages.")
    system: str | None = option(
        None, "System prompt for records that have none of their own (unset: the template's default; \"\": no "
              "system prompt).")
    max_length: int = option(
        512, "Tokens per row: the longest example (prompt + response + EOS), and the row length of both layouts.")
    overflow: Literal["truncate", "skip"] = option(
        "truncate", "An example longer than max_length: truncate it to max_length (the paper's), or skip it "
                    "(counted as too_long). An example whose prompt alone fills max_length is always skipped.")
    layout: Literal["padded", "packed"] = option(
        "padded", "padded: one example per row, padded to max_length (the paper's); packed: as many whole "
                  "examples per row as fit, never split (example_starts says where each begins).")
    validation_fraction: float = option(
        0.02, "Share of records sent to the validation split, chosen by a keyed hash of each record's messages "
              "(the same record always lands in the same split, whatever the order, workers or tasks).")
    seed: int = option(0, "Key of the split hash.")
    strict: bool = option(
        False, "Fail on the first bad record (malformed JSON, missing field, empty response, wrong role order, too "
               "long with overflow skip, ...), naming file and line, instead of skipping and counting it.")
    shard_size_mb: float = option(
        256.0, "Target size of one train shard, in MB of output (estimated from input sizes, so shard boundaries "
               "do not depend on workers or tasks).")
    chunk_mb: float = option(
        16.0, "Input bytes one worker reads at a time (JSON Lines files are cut by byte range; a JSON array or a "
              "compressed file is one chunk).")
    workers: int = option(0, "Worker processes (0: all cores).")
    num_tasks: int = option(0, "Number of tasks sharing the input (0: SLURM_ARRAY_TASK_COUNT, else 1).")
    task_id: int = option(-1, "This task's index, 0-based (-1: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, else 0).")
    overwrite: bool = option(False, "Delete an existing output folder made with other settings instead of refusing.")

    def validate(self) -> None:
        check(bool(self.tokenizer), "tokenizer", "is required (the merged tokenizer folder)")
        check(bool(self.output), "output", "is required (the shards folder to write)")
        check(bool(self.template), "template", "is required: alpaca, llama2, tokenizer or a .jinja file")
        check(self.max_length >= MIN_SFT_LENGTH, "max_length",
              f"must be at least {MIN_SFT_LENGTH} tokens, got {self.max_length}")
        for name in ("instruction_field", "output_field", "messages_key"):
            check(bool(getattr(self, name)), name, "must not be empty")
        check(0.0 <= self.validation_fraction < 1.0, "validation_fraction",
              f"must be within [0, 1), got {self.validation_fraction}")
        check(self.shard_size_mb > 0, "shard_size_mb", f"must be positive, got {self.shard_size_mb}")
        check(self.chunk_mb > 0, "chunk_mb", f"must be positive, got {self.chunk_mb}")
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(self.num_tasks >= 0, "num_tasks", f"must be >= 0, got {self.num_tasks}")
        if self.num_tasks and self.task_id >= 0:
            check(self.task_id < self.num_tasks, "task_id",
                  f"{self.task_id} is outside 0..{self.num_tasks - 1} (num_tasks {self.num_tasks})")


@dataclass
class FinalizeConfig(Section):
    """Join the tasks' output into manifest.json (cllama preprocess finalize)."""

    output: PathStr = option("", "The shards folder the tasks wrote into.", aliases=["--out"])
    verify: bool = option(True, "Re-read every shard and check its sha256 before writing the manifest.")

    def validate(self) -> None:
        check(bool(self.output), "output", "is required (the shards folder)")


@dataclass
class DataSetConfig(Section):
    """One shard set of a mixture: a name (in logs and metrics), the preprocessor's output folder, a weight.

    In YAML ``{name: zh, path: shards/zh, weight: 0.9}``; as a flag ``--data.sets zh=shards/zh:0.9 en=shards/en:0.1``.
    """

    name: str = option("", "Name of the set: the key of its metrics (eval zh/bits_per_char) and of its share.")
    path: PathStr = option("", "The preprocessor's output folder of this set (Arrow shards + manifest.json).")
    weight: float = option(1.0, "Relative share of this set's sequences in the mixture (normalised over all sets).")

    @classmethod
    def from_text(cls, text: str) -> DataSetConfig:
        """``NAME=PATH[:WEIGHT]`` (the flag's form)."""
        name, eq, rest = text.partition("=")
        if not eq:
            raise ConfigError("", f"expected NAME=PATH[:WEIGHT], got {text!r}")
        path, colon, weight = rest.rpartition(":")
        if not colon or not _is_number(weight):
            path, weight = rest, "1"
        return cls(name=name.strip(), path=path, weight=weight)

    def validate(self) -> None:
        check(bool(self.name), "name", "is required (it names the set in logs and metrics)")
        check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None, "name",
              f"{self.name!r} may hold only letters, digits, '_', '.' and '-' (it becomes a metrics key)")
        check(bool(self.path), "path", f"set {self.name!r}: is required (its shards folder)")
        check(self.weight > 0, "weight", f"set {self.name!r}: must be positive, got {self.weight}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclass
class DataConfig(Section):
    """What the trainer reads, and how it batches it: one shard folder (path), or a weighted mixture of several
    (sets; ``data:`` given a list in YAML means sets)."""

    list_field = "sets"  # config.nest: `data: [{name, path, weight}, ...]` fills data.sets

    path: PathStr = option("", "The preprocessor's output folder (Arrow shards + manifest.json).")
    sets: list[DataSetConfig] = option(
        [], "Several shard sets mixed by weight, each {name, path, weight} (instead of path): every sample position "
            "draws its set from the seed, so a resume on any number of processes continues the same mixture; a set "
            "that runs out starts a fresh permutation of itself. As flags: --data.sets zh=DIR:0.9 en=DIR:0.1.")
    block_size: int = option(0, "Sequence length; must equal the shards' block size (0: take it from the manifest).")
    micro_batch_size: int = option(1, "Sequences per process per forward pass.")
    grad_accum: int = option(1, "Gradient accumulation steps (ignored when global_batch_size is set).")
    global_batch_size: int = option(
        0, "Sequences per optimizer step over all processes; fixes grad_accum = global / (micro x processes), so "
           "the same run resumes on another number of processes with the same batches (0: use grad_accum).")
    document_mask: bool = option(
        False, "Keep the documents packed into a block apart: attention does not cross a document boundary, "
               "position ids restart at each document, and a document's first token is not predicted from the one "
               "before (needs shards made with `cllama preprocess --record-boundaries`, every set of a mixture; "
               "instruction-tuning rows are always kept apart). Costs speed on the CPU (docs/mixing.md).")

    def validate(self) -> None:
        check(not (self.path and self.sets), "sets", "give either path (one shard folder) or sets (a mixture), not both")
        names = [s.name for s in self.sets]
        dup = sorted({n for n in names if names.count(n) > 1})
        check(not dup, "sets", f"set names must be unique; repeated: {', '.join(dup)}")
        folders = [s.path for s in self.sets]
        same = sorted({f for f in folders if folders.count(f) > 1})
        check(not same, "sets", f"two sets read the same folder {', '.join(same)}")
        check(self.block_size >= 0, "block_size", f"must be >= 0, got {self.block_size}")
        check(self.micro_batch_size >= 1, "micro_batch_size", f"must be at least 1, got {self.micro_batch_size}")
        check(self.grad_accum >= 1, "grad_accum", f"must be at least 1, got {self.grad_accum}")
        check(self.global_batch_size >= 0, "global_batch_size", f"must be >= 0, got {self.global_batch_size}")

    def mixture(self) -> list[DataSetConfig]:
        """The sets to read: ``sets``, or the one folder ``path`` as a set of weight 1 named ``data``."""
        if self.sets:
            return list(self.sets)
        return [DataSetConfig(name="data", path=self.path, weight=1.0)] if self.path else []
