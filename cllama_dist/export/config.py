"""Settings of ``cllama export adapter`` and ``cllama export merged``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import PathStr, Section, check, option, require


@dataclass
class ExportAdapterConfig(Section):
    """A PEFT adapter (LoRA + new embedding rows) from a run's checkpoint, with the merged tokenizer."""

    run: PathStr = option("", "The run folder (output_dir of the training).")
    step: int = option(0, "Checkpoint step (0: the newest valid one).")
    out: PathStr = option("", "Output folder.")
    overwrite: bool = option(False, "Replace an adapter folder exported earlier (never any other folder).")
    template: str = option("", "Chat template to write into the exported tokenizer_config.json: alpaca, llama2 or a "
                               ".jinja file (default: the one the run trained through, named in its data manifest; "
                               "none for a pre-training run). Refused when the run names another.")

    def validate(self) -> None:
        check(bool(self.run), "run", "is required (the run folder)")
        check(bool(self.out), "out", "is required (the output folder)")
        check(self.step >= 0, "step", f"must be >= 0, got {self.step}")


@dataclass
class ExportMergedConfig(Section):
    """A full Hugging Face model: base + adapter, merged shard by shard."""

    base: PathStr = option("", "The base model folder (safetensors).")
    adapter: PathStr = option("", "A folder from `cllama export adapter`.")
    out: PathStr = option("", "Output folder.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", "Weights dtype of the merged model (auto: the "
                                                                    "base's).")
    overwrite: bool = option(False, "Replace a merged model exported earlier (never any other folder).")

    def validate(self) -> None:
        require(self, "base", "adapter", "out")
