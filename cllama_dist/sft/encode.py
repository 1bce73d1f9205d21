"""Token ids and loss mask of a conversation: the paper's tokenization, and the rule behind it.

The paper (both build_dataset.py files) tokenizes the prompt and the target separately::

    source = PROMPT_TEMPLATE.format_map({"instruction": instruction})
    target = f"{output}{tokenizer.eos_token}"
    input_ids = tokenizer(source)["input_ids"] + tokenizer(target, add_special_tokens=False)["input_ids"]
    labels    = [-100] * len(source ids) + target ids,   both cut to max_seq_length (512)

With LLaMA's slow tokenizer (legacy: SentencePiece on each piece of text between special tokens)
that is ``[BOS] + sp.encode(source) + sp.encode(output) + [EOS]``: a dummy-prefix "▁" at the start
of the response, and for v1, whose source ends in "Response: ", also a lone "▁" token for that
trailing space before it.

The rule here, which gives exactly that stream and generalises it to any template and to several
turns: a rendered conversation is a sequence of text segments and special tokens (see
templates.py). Text between two special tokens is one *chunk*, the unit that stock tokenization
(transformers' SentencePieceBackend with legacy=True, which the exported tokenizer folder uses)
encodes with one call of SentencePiece, dummy prefix included. Each segment is encoded on its own: the
first segment of a chunk as SentencePiece encodes a text, every later one as the continuation of a
text (the same model with ``add_dummy_prefix`` off). The templates write the paper's dummy prefix as
a space before each response (" " + output), so the continuation encoding of " " + output is exactly
the paper's ``sp.encode(output)``. BOS and EOS are placed by id, never by tokenizing their text.

Why segment by segment and not the rendered string: the loss mask must fall on token boundaries, and
inference must see the very ids training saw. Encoding segments separately makes every prompt/target
boundary a token boundary, and the prompt of turn k (what ``apply_chat_template(...,
add_generation_prompt=True)`` returns) is then exactly the training prefix, because a prompt always
ends a segment. Where stock tokenization of the whole rendered string *also* splits at the boundary,
the two encodings are identical (SentencePiece's BPE and unigram segmentations of a string that is
cut at a piece boundary are the segmentations of the two halves); pieces never hold a "▁" after a
non-"▁" character (split_by_whitespace), so a boundary just before a space-led response is always
clean. One case is not: v1's prompt ends with a space (its last token a lone "▁"), and when the
response's own encoding starts with a whitespace-only piece (a lone "▁" when it starts with a
character that has no "▁x" piece, e.g. "。" or a rare character; "▁▁" when it starts with a space),
tokenizing any string merges the two into "▁▁" / "▁▁▁", pieces LLaMA's vocabulary has. The paper's
stream keeps them apart, so such a multi-turn v1 *history* cannot be reproduced by a string; v1's
prompts otherwise, and all of llama2, are. ``stock_ids`` gives the string tokenization, to count these.

Truncation: the paper cuts input_ids and labels to max_seq_length; ``overflow="truncate"`` does that,
``"skip"`` drops over-long examples instead. Either way an example with no target token left (the
prompt alone fills max_len) is skipped: it would contribute a loss over zero tokens.

Nothing here imports torch: this runs in the offline preprocessor on CPU nodes.
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator, Literal, NamedTuple

from ..errors import UserError
from .templates import TARGET, Segment, Template, to_messages

OVERFLOW = ("truncate", "skip")
ENCODE_SKIP_REASONS = ("too_long", "prompt_too_long")
IGNORE_INDEX = -100


class Encoded(NamedTuple):
    input_ids: list[int]
    loss_mask: list[int]  # 1 on response tokens and their EOS, 0 elsewhere (BOS, system, user, template text)
    truncated: bool = False


class Skip(NamedTuple):
    reason: str  # one of ENCODE_SKIP_REASONS
    length: int  # tokens before truncation


# --------------------------------------------------------------------------------------------------
# The continuation encoder and the checks, built once per SentencePieceProcessor.

_PROCESSORS: dict[int, tuple[object, object, object]] = {}


def _proto(sp):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    return m


def continuation(sp):
    """The same model with the dummy prefix off: encodes text that continues a chunk."""
    hit = _PROCESSORS.get(id(sp))
    if hit is not None and hit[0] is sp:
        return hit[1]
    import sentencepiece as spm

    m = _proto(sp)
    if m.normalizer_spec.remove_extra_whitespaces:
        raise UserError(
            "instruction tuning needs a tokenizer whose normalizer keeps whitespace "
            "(remove_extra_whitespaces=false, like LLaMA's): prompt and response are tokenized apart, and a "
            "normalizer that strips leading and trailing spaces would drop the space between them"
        )
    m.normalizer_spec.add_dummy_prefix = False
    cont = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    if len(_PROCESSORS) > 16:
        _PROCESSORS.clear()
    _PROCESSORS[id(sp)] = (sp, cont, set())  # the reference to sp keeps id(sp) from being reused
    return cont


def _check(template: Template, sp) -> None:
    continuation(sp)
    checked = _PROCESSORS[id(sp)][2]
    if template.sha256 in checked:
        return
    for name, i in (("BOS", sp.bos_id()), ("EOS", sp.eos_id())):
        if i < 0:
            continue
        literal = sp.id_to_piece(i)
        if literal in template.source:
            raise UserError(
                f"chat template {template.name} ({template.origin}) writes the {name} token {literal!r} as text; "
                f"write {{{{ {name.lower()}_token }}}} instead, so that it is placed by id and never tokenized"
            )
    checked.add(template.sha256)


def _special_id(sp, special: str) -> int:
    i = sp.bos_id() if special == "bos" else sp.eos_id()
    if i < 0:
        raise UserError(f"the template places a {special.upper()} token, but the tokenizer has none")
    return i


# --------------------------------------------------------------------------------------------------

def encode_segments(segments: Iterable[Segment], sp) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of rendered segments, by the rule in the module docstring."""
    cont = continuation(sp)
    ids: list[int] = []
    mask: list[int] = []
    chunk_start = True
    for seg in segments:
        m = 1 if seg.kind == TARGET else 0
        if seg.special is not None:
            ids.append(_special_id(sp, seg.special))
            mask.append(m)
            chunk_start = True
            continue
        if not seg.text:
            continue
        piece = sp.encode(seg.text) if chunk_start else cont.encode(seg.text)
        chunk_start = False
        ids.extend(piece)
        mask.extend([m] * len(piece))
    return ids, mask


def encode_conversation(conv, template: Template, sp, max_len: int, *,
                        overflow: Literal["truncate", "skip"] = "truncate") -> Encoded | Skip:
    """Token ids and loss mask of a training conversation (ending with an assistant message)."""
    if overflow not in OVERFLOW:
        raise UserError(f"overflow must be one of {', '.join(OVERFLOW)}, not {overflow!r}")
    if max_len < 1:
        raise UserError(f"max_len must be positive, not {max_len}")
    messages = to_messages(conv)
    if not messages or messages[-1]["role"] != "assistant":
        raise UserError("a training conversation must end with an assistant message")
    _check(template, sp)
    ids, mask = encode_segments(template.segments(messages), sp)
    n = len(ids)
    truncated = False
    if n > max_len:
        if overflow == "skip":
            return Skip("too_long", n)
        ids, mask, truncated = ids[:max_len], mask[:max_len], True
    if not any(mask):
        return Skip("prompt_too_long", n)
    return Encoded(ids, mask, truncated)


def user_turn(text: str, history: list[tuple[str, str]] = (), system: str | None = None) -> list[dict]:
    """The messages of a conversation so far ending with the user's ``text``: the shape encode_prompt takes."""
    out = [] if system is None else [{"role": "system", "content": system}]
    for user, assistant in history:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    out.append({"role": "user", "content": text})
    return out


def encode_prompt(messages, template: Template, sp) -> list[int]:
    """Ids an inference prompt must have: the conversation so far, ending with the user's message.

    Equal, token for token, to the prefix training saw before the answer to that message.
    """
    messages = to_messages(messages)
    if not messages or messages[-1]["role"] != "user":
        raise UserError("an inference prompt must end with a user message")
    _check(template, sp)
    return encode_segments(template.segments(messages), sp)[0]


def stock_ids(conv, template: Template, sp) -> list[int]:
    """What tokenizing the rendered string gives: each chunk between special tokens in one call of
    SentencePiece, as transformers' SentencePieceBackend (legacy=True) does for apply_chat_template.
    Equal to the training ids except where a v1 history cannot be reproduced (module docstring)."""
    _check(template, sp)
    ids: list[int] = []
    chunk: list[str] = []
    for seg in template.segments(to_messages(conv)):
        if seg.special is None:
            chunk.append(seg.text)
            continue
        if chunk:
            ids.extend(sp.encode("".join(chunk)))
            chunk = []
        ids.append(_special_id(sp, seg.special))
    if chunk:
        ids.extend(sp.encode("".join(chunk)))
    return ids


def labels(input_ids: list[int], loss_mask: list[int], ignore_index: int = IGNORE_INDEX) -> list[int]:
    """The paper's labels: the token where the mask is 1, ``ignore_index`` (-100) elsewhere."""
    return [t if m else ignore_index for t, m in zip(input_ids, loss_mask)]


class EncodeStats:
    """Counts over a stream of conversations: kept, truncated, skipped by reason, tokens."""

    def __init__(self) -> None:
        self.kept = 0
        self.truncated = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.tokens = 0
        self.target_tokens = 0

    def as_dict(self) -> dict:
        return {"kept": self.kept, "truncated": self.truncated,
                "skipped": {r: int(self.skipped.get(r, 0)) for r in ENCODE_SKIP_REASONS},
                "tokens": self.tokens, "target_tokens": self.target_tokens}


def encode_all(conversations: Iterable, template: Template, sp, max_len: int, *,
               overflow: Literal["truncate", "skip"] = "truncate",
               stats: EncodeStats | None = None) -> Iterator[Encoded]:
    """Encode a stream, yielding the kept examples and counting the rest in ``stats``."""
    stats = stats if stats is not None else EncodeStats()
    for conv in conversations:
        r = encode_conversation(conv, template, sp, max_len, overflow=overflow)
        if isinstance(r, Skip):
            stats.skipped[r.reason] += 1
            continue
        stats.kept += 1
        stats.truncated += r.truncated
        stats.tokens += len(r.input_ids)
        stats.target_tokens += sum(r.loss_mask)
        yield r
