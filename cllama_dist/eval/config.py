"""Settings of ``cllama eval``: which model, which text or shards, and generation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..assets import ZH_PROMPTS
from ..config import PathStr, check, option
from ..data.config import CorpusConfig


@dataclass
class EvalConfig(CorpusConfig):
    """Loss, perplexity and bits per character of a model on held-out text or shards (cllama eval)."""

    model: PathStr = option("", "The model: a Hugging Face folder (a base model, or a merged one from "
                                "`cllama export merged`).")
    adapter: PathStr = option(
        "", "An adapter folder from `cllama export adapter`, loaded with stock PEFT on top of --model (the base it "
            "was trained from, resized to the adapter's tokenizer).")
    tokenizer: PathStr = option(
        "", "Tokenizer folder or .model (default: the adapter's, else the model folder's). Must be the one the "
            "model was trained with.")
    shards: PathStr = option(
        "", "Evaluate on a shard folder from `cllama preprocess` instead of text (bits per character from the "
            "shards' character counts, format cllama-shards/2; older shards: loss and perplexity only).")
    split: Literal["validation", "train"] = option("validation", "Which split of --shards.")
    text: list[str] = option(
        [], "Named text inputs, NAME=PATH (a file, folder or glob; several joined by commas), e.g. --text "
            "zh=heldout_zh.jsonl en=heldout_en.jsonl: each is scored on its own and the result is a table of bits per "
            "character per input and per model (--compare, --compare-base).")
    shard_sets: list[str] = option(
        [], "Named shard folders, NAME=DIR (their --split), scored like --text into the same table; only a model "
            "with the shards' tokenizer can score them (the others show n/a).")
    compare: list[str] = option(
        [], "Further models scored on the same named inputs, each a column of the table: NAME=MODEL (a Hugging Face "
            "folder, e.g. merged=out/merged) or NAME=MODEL+ADAPTER; each with its own tokenizer (the adapter's, "
            "else the model folder's).")
    compare_base: bool = option(
        False, "With --adapter and named inputs: also score --model alone with the tokenizer of its folder (the "
               "table's 'base' column: before training).")
    block_size: int = option(
        1024, "Window length in tokens. Text longer than a window is cut into consecutive windows that predict "
              "every token exactly once (capped at the model's max_position_embeddings).")
    batch_size: int = option(4, "Windows per forward pass.")
    max_documents: int = option(0, "Stop after this many documents (text) or blocks (shards); 0: all.")
    loss: Literal["chunked", "hf"] = option(
        "chunked", "How the loss is computed: chunked (a few hundred tokens at a time, never the full tokens x "
                   "vocabulary logits; model/loss.py) or hf (from the full logits, the reference; the same figures "
                   "within fp32 rounding).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", "Weights dtype; auto: bf16 on a GPU, fp32 on the CPU.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    generate: bool = option(False, "Also sample continuations of --prompts and report generation speed (tokens/s).")
    prompts: list[str] = option(ZH_PROMPTS, "Prompts for --generate.", aliases=["--prompt"])
    template: str = option(
        "auto", "How --generate and --instructions format prompts: auto (the model's own chat_template, from "
                "tokenizer_config.json in the tokenizer, adapter or model folder; without one --generate continues the "
                "raw prompt), none (raw continuation), or alpaca, llama2, a .jinja file: each prompt becomes a "
                "single-turn instruction, encoded as training encoded it, and its answer ends at EOS.")
    instructions: PathStr = option(
        "", "Held-out instructions (Alpaca JSON / JSON Lines: instruction, input, output; or chat records, the last "
            "assistant message expected): report the share answered exactly. Each answer is generated greedily "
            "through the chat template until EOS (or a token budget of the expected answer's UTF-8 bytes + 8, past "
            "which no answer can match) and decoded with SentencePiece; answer and expected output are compared as "
            "strings after str.strip() of each (whitespace at both ends), nothing else normalised. Records with a "
            "'task' field are also counted per task. --max-documents limits the records.")
    choices: list[PathStr] = option(
        [], "Multiple-choice files in C-Eval / CMMLU CSV form (question, options A-D, answer; the subject is the file "
            "name without _val/_test/_dev and .csv) or folders of them: accuracy per subject and overall, each "
            "option scored by the model's log-likelihood of it after the question (see choices_score).")
    choices_dev: list[PathStr] = option(
        [], "Few-shot examples: CSV files or folders of the same form ({subject}_dev.csv), the first --shots of each "
            "subject put before its questions with their answers.")
    shots: int = option(0, "Few-shot examples per question, from choices_dev (C-Eval's and CMMLU's convention: 0 or 5).")
    choices_score: Literal["letter", "text"] = option(
        "letter", "What is scored after the prompt (which ends '答案：'): the option's letter (A-D, as C-Eval's and "
                  "CMMLU's own evaluations and lm-eval do), or the option's text (its summed log-likelihood).")
    max_new_tokens: int = option(48, "Tokens generated per prompt (raw continuations are always this long; answers "
                                     "through a template stop at EOS).")
    temperature: float = option(0.7, "Sampling temperature for --generate; 0: greedy.")
    top_p: float = option(0.9, "Nucleus sampling threshold for --generate.")
    seed: int = option(0, "Seed of the sampling.")
    json_out: PathStr = option("", "Write the figures (and generations) as JSON to this path.")

    def validate(self) -> None:
        super().validate()
        check(bool(self.model), "model", "is required (a Hugging Face model folder)")
        named = bool(self.text or self.shard_sets)
        for key in ("text", "shard_sets", "compare"):
            items = getattr(self, key)
            for item in items:
                name, eq, value = item.partition("=")
                check(bool(eq and name.strip() and value.strip()), key, f"expected NAME=PATH, got {item!r}")
            names = [i.partition("=")[0].strip() for i in items]
            dup = sorted({n for n in names if names.count(n) > 1})
            check(not dup, key, f"names must be unique; repeated: {', '.join(dup)}")
        both = {i.partition("=")[0].strip() for i in self.text} & {i.partition("=")[0].strip() for i in self.shard_sets}
        check(not both, "shard_sets", f"names shared with --text: {', '.join(sorted(both))}")
        check(not (self.compare or self.compare_base) or named, "compare",
              "compares models on named inputs: give --text NAME=FILE or --shard-sets NAME=DIR")
        check(not self.compare_base or bool(self.adapter), "compare_base", "needs --adapter (the base is --model)")
        if named:
            check(not (self.inputs or self.shards), "text",
                  "give named inputs (--text / --shard-sets) or --inputs / --shards, not both")
        elif self.instructions or self.choices:
            check(not (self.inputs and self.shards), "inputs",
                  "give --inputs (text: bits per character) or --shards (tokens), not both")
        else:
            check(bool(self.inputs) != bool(self.shards), "inputs",
                  "give either --inputs (text: bits per character) or --shards (tokens), not both or neither "
                  "(or only --instructions / --choices)")
        check(0 <= self.shots <= 10, "shots", f"must be within 0..10, got {self.shots}")
        check(not self.shots or bool(self.choices_dev), "shots", "few-shot examples need choices_dev (the dev files)")
        check(self.block_size >= 2, "block_size", f"must be at least 2, got {self.block_size}")
        check(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        check(self.max_documents >= 0, "max_documents", f"must be >= 0, got {self.max_documents}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be within (0, 1], got {self.top_p}")
