"""Settings of ``cllama chat`` (light: the CLI reads this module at start-up, so nothing here imports torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from .config import PathStr, Section, check, option


@dataclass
class ChatConfig(Section):
    """A multi-turn chat with an instruction-tuned model, prompts formatted exactly as training formatted them."""

    model: PathStr = option("", "The model: a Hugging Face folder (a merged model from `cllama export merged`, or the "
                                "base of --adapter).")
    adapter: PathStr = option("", "An adapter folder from `cllama export adapter`, loaded with stock PEFT on top of "
                                  "--model.")
    tokenizer: PathStr = option("", "Tokenizer folder or .model (default: the adapter's, else the model folder's). "
                                    "Must hold tokenizer.model: prompts are encoded and answers decoded with "
                                    "SentencePiece.")
    template: str = option("", "Chat template: alpaca, llama2 or a .jinja file (default: the model's own, the "
                               "chat_template of tokenizer_config.json in the tokenizer, adapter or model folder, "
                               "which `cllama export` writes there).")
    system: Optional[str] = option(None, "System prompt: replaces the template's default system text; '' removes "
                                         "the system part (default: the template's).")
    message: list[str] = option([], "A user message, answered without a prompt (repeat for a scripted multi-turn "
                                    "conversation; /reset and /exit work here too). Without it, messages are read "
                                    "interactively, or one per line from stdin when stdin is not a terminal.")
    max_new_tokens: int = option(256, "Tokens per answer at most (an answer ends at EOS; fewer where the model's "
                                      "context would overflow).")
    temperature: float = option(0.7, "Sampling temperature; 0: greedy (deterministic).")
    top_p: float = option(0.9, "Nucleus sampling threshold.")
    seed: int = option(0, "Seed of the sampling (set once, at the start of the chat).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = option("auto", "Weights dtype; auto: bf16 on a GPU, fp32 on the "
                                                                    "CPU.")
    device: str = option("auto", "auto, cpu, cuda or cuda:N.")
    json_out: PathStr = option("", "Write the transcript as JSON to this path (messages, prompt and answer token "
                                   "ids, why each answer stopped), rewritten after every answer.")

    def validate(self) -> None:
        check(bool(self.model), "model", "is required (a Hugging Face model folder)")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be within (0, 1], got {self.top_p}")
