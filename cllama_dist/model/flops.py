"""FLOPs per trained token, the numerator of MFU. Written once, here.

Notation: L layers, H hidden size, s sequence length, V' the extended vocabulary; a matmul with a weight
of P parameters costs 2P FLOPs per token (one multiply and one add per weight).

    N_layers = L x (2H² + 2H·H_kv + 3H·I)      attention q,o + k,v projections + the SwiGLU MLP
    N_head   = V' x H                           lm_head (embed_tokens is a lookup: no FLOPs)
    N_lora   = LoRA A and B matrices            (r x (in + out) per adapted projection)
    N        = N_layers + N_head + N_lora       every weight a token passes through

What this trainer actually computes, per token:

    forward                               2N
    backward, gradient of activations     2N   (needed everywhere: LoRA sits in every layer)
    backward, gradient of weights         2 x N_trainable_matmul
                                               (LoRA + the trainable lm_head rows; frozen weights
                                                get none, which is where LoRA saves a third)
    recomputation under checkpointing     c x 2 x (N_layers + N_lora)   (the decoder layers' forward again;
                                               c = the share of layers checkpointed: 1 for all, ceil(L/2)/L
                                               for every-other)
    attention scores and values           4·L·H·s forward, twice that backward, c times more recomputed

So a frozen base with LoRA does about 4N (6N with recomputation) plus attention, against the 6N of full
training. The *conventional* figure, 6N + 12·L·H·s with N all parameters except the input embedding
table (PaLM's appendix B; nanoGPT), is printed beside it, labelled, because it is what others report.
Attention is counted in full, not halved for the causal mask, as both conventions do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "Arch":
        heads = config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, config.vocab_size)

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_params(self) -> int:
        h = self.hidden
        return self.layers * (2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate)

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden


def checkpointed_layers(layers: int, scope: str) -> list[int]:
    """The decoder layers that gradient checkpointing recomputes under ``model.checkpoint_scope`` (the same rule
    as transformers' ``every_n_layers``: layer i when i % n == 0)."""
    every = {"all": 1, "every-other": 2}[scope]
    return [i for i in range(layers) if i % every == 0]


def checkpoint_share(layers: int, enabled: bool, scope: str = "all") -> float:
    """c above: the share of the decoder layers recomputed in the backward pass."""
    return len(checkpointed_layers(layers, scope)) / layers if enabled else 0.0


def flops_per_token(arch: Arch, seq_len: int, lora_params: int, trainable_head_rows: int,
                    checkpointing: bool | float) -> dict[str, float]:
    """``actual``: what this trainer computes; ``conventional``: 6N + 12·L·H·s, for comparison.
    ``checkpointing``: the share of layers recomputed (True = all of them)."""
    n_layers = arch.layer_params + lora_params
    n = n_layers + arch.head_params
    attention = 4 * arch.layers * arch.hidden * seq_len
    trainable_matmul = lora_params + trainable_head_rows * arch.hidden
    actual = 2 * n + 2 * n + 2 * trainable_matmul + 3 * attention
    actual += float(checkpointing) * (2 * n_layers + attention)
    conventional = 6 * n + 12 * arch.layers * arch.hidden * seq_len
    return {"actual": float(actual), "conventional": float(conventional)}


def run_flops(config, orig_vocab: int, new_vocab: int, embeddings: str, seq_len: int, lora_params: int,
              checkpointing: bool | float) -> dict[str, float]:
    """``flops_per_token`` for a run: the model config's shape at the extended vocabulary, with the lm_head
    rows that train under ``embeddings`` (all of them for "full", the appended ones for "new-rows")."""
    arch = dataclasses.replace(Arch.from_config(config), vocab=new_vocab)
    head_rows = new_vocab if embeddings == "full" else new_vocab - orig_vocab
    return flops_per_token(arch, seq_len, lora_params, head_rows, checkpointing)


# Dense bf16 peak of one device, TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 125.0}


def peak_tflops(device_name: str) -> float:
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return 0.0
