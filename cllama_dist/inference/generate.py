"""Generation: sampling settings, the two ways a model is asked for tokens, and the streamed decode of its answer.

    from cllama_dist.inference.generate import Sampling, generate_ids
    new, stop = generate_ids(model, prompt_ids, sp.eos_id(), Sampling(64), device)

- ``generate_ids``: an answer, until EOS or ``max_new_tokens``; each new id handed to a callback as soon as
  it is chosen (chat streams through it; held-out instructions and ``cllama eval --generate`` with a
  template take the ids). Sampling with a temperature is nucleus sampling alone (top-k off).
- ``continue_ids``: a raw continuation of exactly ``max_new_tokens`` tokens (EOS suppressed), the figure
  tokens per second is measured on (``cllama eval --generate`` without a template, the demo). Sampling
  keeps the model's generation_config for what it does not set (its top-k included), as it always has.

Answers are decoded with SentencePiece (byte-fallback pieces become the characters they spell) and
streamed as they are generated: a piece is handed out as soon as the text it ends with is complete
characters. A character that falls back to bytes arrives as several tokens (one per UTF-8 byte); the
bytes are held back until the character is whole, so a partial character (U+FFFD) or a piece name
such as ``<0xE4>`` is never shown. What is streamed is, concatenated, exactly ``sp.decode`` of the
answer's ids (tested).

Nothing here imports torch at module level: chat's module imports this one, and the CLI reads chat's.
"""

from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0


# --------------------------------------------------------------------------------------------------
# Streaming decode.


def _byte_value(sp, token: int) -> int:
    return int(sp.id_to_piece(token)[1:-1], 16)  # "<0xE4>" -> 0xE4


class StreamDecoder:
    """The text of generated ids, handed out piece by piece, never a partial character.

    ``push`` returns the text that became final with a token: the decoding of all ids so far, less the
    trailing byte-fallback pieces that are the start of a character not yet complete (those wait for the
    rest of their bytes). ``finish`` returns what is left (a character cut by the end of generation comes
    out as SentencePiece decodes it, U+FFFD). The pieces concatenated equal ``sp.decode(ids)``.
    """

    def __init__(self, sp):
        self.sp = sp
        self.ids: list[int] = []
        self.shown = ""

    def _pending(self) -> int:
        """How many trailing ids are the leading bytes of an incomplete UTF-8 character."""
        run: list[int] = []
        for t in reversed(self.ids):
            if not self.sp.is_byte(t):
                break
            run.append(t)
        if not run:
            return 0
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        dec.decode(bytes(_byte_value(self.sp, t) for t in reversed(run)), final=False)
        return len(dec.getstate()[0])  # bytes the decoder holds: a character's start, waiting for the rest

    def _emit(self, text: str) -> str:
        if not text.startswith(self.shown):
            return ""  # not seen with SentencePiece's decoding; what is shown can never be taken back
        new, self.shown = text[len(self.shown):], text
        return new

    def push(self, token: int) -> str:
        self.ids.append(token)
        pending = self._pending()
        return self._emit(self.sp.decode(self.ids[:len(self.ids) - pending]))

    def finish(self) -> str:
        return self._emit(self.sp.decode(self.ids))

    @property
    def text(self) -> str:
        return self.sp.decode(self.ids)


# --------------------------------------------------------------------------------------------------
# Generation.


def generate_ids(model, prompt_ids: list[int], eos_id: int, sampling: Sampling, device,
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], str]:
    """The ids generated after ``prompt_ids`` (without the final EOS) and why generation stopped: "eos" or
    "max_new_tokens". ``on_token`` is called with each new id but EOS as soon as it is chosen."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Streamer(BaseStreamer):
        # generate() hands the streamer the prompt first, then each new token.
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for t in value.reshape(-1).tolist():
                if t != eos_id and on_token is not None:
                    on_token(int(t))

        def end(self):
            pass

    if sampling.temperature > 0:
        gc = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=True,
                              temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
    else:
        gc = GenerationConfig(max_new_tokens=sampling.max_new_tokens, do_sample=False)
    gc.eos_token_id = eos_id
    gc.pad_token_id = eos_id
    gc.use_cache = True
    x = torch.tensor([prompt_ids], device=device)
    with torch.no_grad():
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc,
                           streamer=Streamer() if on_token is not None else None)
    new = y[0, len(prompt_ids):].tolist()
    if new and new[-1] == eos_id:
        return new[:-1], "eos"
    return new, "max_new_tokens"


def continue_ids(model, prompt_ids: list[int], sampling: Sampling, device, pad_id: int = 0) -> tuple[list[int], float]:
    """(exactly ``sampling.max_new_tokens`` ids sampled after ``prompt_ids``, seconds taken): EOS cannot end
    the continuation early, so every call measures the same number of tokens."""
    import torch

    how = (dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p) if sampling.temperature > 0
           else dict(do_sample=False))
    x = torch.tensor([prompt_ids], device=device)
    t0 = time.perf_counter()
    with torch.no_grad():
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=sampling.max_new_tokens,
                           min_new_tokens=sampling.max_new_tokens, use_cache=True, pad_token_id=pad_id, **how)
    seconds = time.perf_counter() - t0
    return y[0, len(prompt_ids):].tolist(), seconds
