"""`cllama tokenizer report` when a tokenizer is a byte-level BPE: the same table, plus the BPE checks.

A later tokenizer that holds every token of the first at the same id is analysed as its extension: new tokens
their own text does not produce (unreachable), new tokens never emitted on the corpus, base-language invariance
(texts without the new script whose ids change: must be 0), decode round trip on the corpus, digit grouping.
"""

from __future__ import annotations

import json
import re

from ..config import to_dict
from ..data.corpus import RecordReader, resolve_inputs
from ..errors import UserError
from ..files import write_atomic
from . import backend, bpe
from .bpe_checks import base_language_texts, changed_ids, digit_grouping
from .config import ReportConfig
from .script import ScriptRule

BATCH = 512
MULTI_DIGIT = re.compile("[0-9]{2,}")


def _load(path: str):
    """Either backend as a tokenizers.Tokenizer (SentencePiece through its folder's exact tokenizer.json)."""
    if backend.detect(path) == "bpe":
        return bpe.load(path)[0]
    from pathlib import Path
    from tokenizers import Tokenizer

    p = Path(path)
    f = (p if p.is_dir() else p.parent) / bpe.TOKENIZER_JSON
    if not f.is_file():
        raise UserError(f"{path} is a SentencePiece model without a tokenizer.json beside it: compare it with a BPE "
                        "tokenizer through a folder written by `cllama tokenizer merge --new-piece-score exact`")
    return Tokenizer.from_file(str(f))


def _extends(base, tok) -> bool:
    bv, v = base.get_vocab(with_added_tokens=True), tok.get_vocab(with_added_tokens=True)
    return len(v) > len(bv) and all(v.get(t) == i for t, i in bv.items())


def report(cfg: ReportConfig) -> dict:
    toks = [_load(t) for t in cfg.tokenizers]
    reader = RecordReader(cfg.text_field, cfg.strict)
    sources = resolve_inputs(cfg.inputs)
    docs = chars = nbytes = 0
    totals = [0] * len(toks)
    usage = [dict() for _ in toks]
    round_trip = [0] * len(toks)
    batch: list[str] = []

    def flush() -> None:
        for k, tok in enumerate(toks):
            enc = tok.encode_batch(batch, add_special_tokens=False)
            dec = tok.decode_batch([e.ids for e in enc], skip_special_tokens=False)
            round_trip[k] += sum(1 for t, d in zip(batch, dec) if t != d)
            u = usage[k]
            for e in enc:
                totals[k] += len(e.ids)
                for i in e.ids:
                    u[i] = u.get(i, 0) + 1
        batch.clear()

    for src in sources:
        for doc in reader.read(src):
            docs += 1
            chars += len(doc.text)
            nbytes += len(doc.text.encode("utf-8"))
            batch.append(doc.text)
            if len(batch) >= BATCH:
                flush()
            if cfg.max_documents and docs >= cfg.max_documents:
                break
        if cfg.max_documents and docs >= cfg.max_documents:
            break
    if batch:
        flush()
    if docs == 0:
        raise UserError("the report corpus holds no usable document")
    rows = []
    rule = ScriptRule("Han")
    texts = None
    for k, (name, tok) in enumerate(zip(cfg.tokenizers, toks)):
        fp = bpe.fingerprint(tok)
        row = {
            "tokenizer": name, "backend": backend.detect(name), "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "sha256": fp["sha256"], "documents": docs, "characters": chars, "utf8_bytes": nbytes, "tokens": totals[k],
            "tokens_per_char": totals[k] / chars, "byte_fallback_share": 0.0, "unk_share": 0.0,
            "reduction_vs_first": totals[0] / max(totals[k], 1), "round_trip_failures": round_trip[k],
            "digit_grouping": digit_grouping(tok),
        }
        if k and _extends(toks[0], tok):
            from .bpe_merge import unreachable

            base_vocab = toks[0].get_vocab(with_added_tokens=True)
            new = {t: i for t, i in tok.get_vocab(with_added_tokens=True).items() if t not in base_vocab}
            bad = unreachable(tok, new)
            texts = texts or base_language_texts()
            multi = [i for t, i in new.items() if MULTI_DIGIT.search(t)]
            row["extension_of_first"] = {
                "added": len(new), "unreachable": len(bad), "unreachable_examples": bad[:20],
                "unused_on_corpus": sum(1 for i in new.values() if not usage[k].get(i)),
                "added_token_share": sum(usage[k].get(i, 0) for i in new.values()) / max(totals[k], 1),
                "multi_digit_pieces": len(multi), "multi_digit_examples": [t for t, i in new.items() if i in multi][:20],
                "multi_digit_tokens_on_corpus": sum(usage[k].get(i, 0) for i in multi),
                "base_language_changed": changed_ids(toks[0], tok, texts, rule),
                "base_language_texts": {g: len(v) for g, v in texts.items()},
            }
        rows.append(row)
    result = {"tokenizers": rows, "skipped": reader.skipped.as_dict(), "inputs": [s.path for s in sources],
              "config": to_dict(cfg)}
    if cfg.json_out:
        write_atomic(cfg.json_out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def format_lines(row: dict) -> list[str]:
    """The BPE-only lines of the table: invariance, round trip, digit grouping."""
    out = []
    ext = row.get("extension_of_first")
    if ext and "base_language_changed" in ext:
        out.append(f"  base-language texts whose ids change (must be 0): {ext['base_language_changed']} of "
                   f"{ext['base_language_texts']}")
    if "round_trip_failures" in row:
        out.append(f"  decode(encode(text)) != text on {row['round_trip_failures']:,} of {row['documents']:,} documents; "
                   f"digits: {' '.join('|'.join(v) for v in list(row['digit_grouping'].values())[:2])}")
    return out
