"""Settings of the model the trainer builds: the base, its extended vocabulary, and the LoRA adapters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import PathStr, Section, check, option

# LLaMA's seven projections: attention q, k, v, o and the SwiGLU MLP's gate, up, down (the paper adapts all).
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig(Section):
    """The base model, the merged tokenizer it is extended to, and what of the embeddings trains."""

    path: PathStr = option(
        "", "Base model: a Hugging Face folder (config.json + weights). Leave empty and set model.config to build a "
            "LLaMA-architecture model with random weights (tests, demo, benchmarks, dry runs).")
    config: dict = option(
        {}, "LlamaConfig fields (hidden_size, num_hidden_layers, ..., vocab_size = the base vocabulary) for a "
            "model built from scratch. Ignored when model.path is set.")
    tokenizer: PathStr = option("", "The merged tokenizer folder (from `cllama tokenizer merge`).")
    extended_vocab: int = option(
        0, "Expected size of the extended vocabulary, len(tokenizer) (the paper: 49,953). With a tokenizer it is a "
           "check; without one (dry runs) it is the size used. 0: take len(tokenizer).")
    embeddings: Literal["new-rows", "full"] = option(
        "new-rows", "What of embed_tokens and lm_head trains. new-rows: only the appended rows, held as their own "
                    "parameters (old rows bit-identical, optimizer state for new rows only). full: both whole "
                    "matrices, the paper's choice, for comparison.")
    new_row_init: Literal["auto", "mean", "subword", "normal"] = option(
        "auto", "Initial value of new rows: subword = the mean of the base rows of the tokens the base tokenizer "
                "encodes the new token's text to (SentencePiece pieces, or a byte-level BPE token's bytes; needs the "
                "base tokenizer named in the merge report; input and output rows each from their own matrix, a tied "
                "model's from its one); mean = mean of the old rows; normal = N(0, new_row_std), the paper's; auto = "
                "subword for a byte-level BPE extension whose base tokenizer (the merge report's) is readable, else "
                "mean (SentencePiece extensions keep mean unless subword is set).")
    new_row_std: float = option(0.02, "Standard deviation of the normal initialisation.")
    gradient_checkpointing: bool = option(True, "Recompute activations in the backward pass (non-reentrant).")
    checkpoint_scope: Literal["all", "every-other"] = option(
        "all", "Which decoder layers gradient checkpointing recomputes (when model.gradient_checkpointing is on): "
               "all, or every-other (layers 0, 2, 4, ...: "
               "the others keep their activations, trading memory for about half the recomputation; FLOPs in "
               "model/flops.py count the share recomputed).")
    attn_implementation: str = option(
        "auto", "transformers attention kernel: sdpa, eager, flash_attention_2, or auto = flash_attention_2 on a GPU "
                "in bf16/fp16 when the flash-attn package is installed, else sdpa (PyTorch's fused kernels, flash "
                "attention among them on GPUs); on the CPU always sdpa.")
    loss: Literal["chunked", "hf"] = option(
        "chunked", "How training, validation and cllama eval compute the loss over the split lm_head. chunked: a "
                   "few hundred tokens at a time over both vocabulary parts, never building the (tokens x vocabulary) "
                   "logits (model/loss.py; for 8 x 2,048 tokens and 49,953 rows ~20x less loss memory); hf: "
                   "transformers' loss over the full logits (the reference; same values within fp32 rounding).")
    loss_kernel: Literal["auto", "torch", "liger", "cce"] = option(
        "auto", "The kernel of the chunked training loss. auto: an installed fused kernel (Liger-Kernel's fused "
                "linear cross-entropy, else Apple's cut-cross-entropy; both Triton, GPU only) after a check at start "
                "that it gives the PyTorch path's loss and gradients, else the pure-PyTorch path (always on the "
                "CPU); torch: the pure-PyTorch path; liger / cce: that kernel (refused off the GPU or when not "
                "installed). Per-token losses (validation, eval) always use the PyTorch path.")
    adapter: PathStr = option(
        "", "Start from model.path + this adapter (a `cllama export adapter` folder, e.g. the pre-training run's): "
            "rank 0 merges them once into RUN/start-model (reused on resume) and the run trains on the merged model, "
            "as instruction tuning does on the merged pre-trained model. Needs model.path.")

    def validate(self) -> None:
        check(bool(self.path) or bool(self.config), "path",
              "set model.path (a Hugging Face folder) or model.config (to build one from a config)")
        check(self.extended_vocab >= 0, "extended_vocab", f"must be >= 0, got {self.extended_vocab}")
        check(self.new_row_std > 0, "new_row_std", f"must be positive, got {self.new_row_std}")
        check(not self.adapter or bool(self.path), "adapter",
              "needs model.path: the base folder the adapter was trained on")


@dataclass
class LoraConfig(Section):
    """LoRA adapters on the frozen base's projections."""

    rank: int = option(8, "LoRA rank (the paper: 8; its v2: 64).")
    alpha: float = option(32.0, "LoRA alpha (the paper: 32; its v2: 128).")
    dropout: float = option(0.05, "LoRA dropout (the paper: 0.05).")
    targets: list[str] = option(LLAMA_PROJECTIONS, "Modules that get LoRA adapters.")

    def validate(self) -> None:
        check(self.rank >= 1, "rank", f"must be at least 1, got {self.rank}")
        check(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(bool(self.targets), "targets", "must name at least one module")


def resolve_dtype(name: str, cuda: bool) -> str:
    """The compute dtype a setting means: ``auto`` is bf16 on a GPU and fp32 on the CPU (where bf16 matrix
    products are slow and tests want exact arithmetic). Used by the trainer and by eval alike."""
    return name if name != "auto" else ("bf16" if cuda else "fp32")


def resolve_attn(name: str, cuda: bool, dtype: str, packed_rows: bool = False) -> str:
    """The attention kernel ``model.attn_implementation`` means on this device: ``auto`` is flash-attn's kernel
    where it can run (a GPU, half precision, the package installed), else sdpa.

    ``packed_rows``: micro-batches of several rows whose examples or documents must be kept apart (packed
    instruction rows, data.document_mask). transformers reads flash-attn's boundaries from position-id restarts
    only for a batch of one row, so model/packing.py refuses flash there; auto takes sdpa (a block-diagonal
    mask) instead of a run that would stop at its first step."""
    if name != "auto":
        return name
    import importlib.util

    if cuda and not packed_rows and dtype in ("bf16", "fp16") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"
