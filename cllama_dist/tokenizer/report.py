"""Side-by-side tokenizer figures on a corpus.

    cllama tokenizer report --tokenizers llama.model merged/ --inputs heldout.jsonl --json-out r.json

For each tokenizer: characters, UTF-8 bytes, tokens, tokens per character, the share of byte-fallback
and unknown tokens, and the ratio of the first tokenizer's token count to this one's ("x fewer").

A tokenizer whose first pieces are exactly the first tokenizer's pieces is analysed as its extension:
- unreachable added pieces (docs/hazards.md#h13): an added piece is *unreachable* when encoding its own surface
  text alone (the piece with "▁" read as a space, no dummy prefix added) does not give that piece.
  Such a piece can still appear inside longer text only by accident of context; most never do, and
  each wastes an embedding row. Also counted: added pieces never emitted on this corpus.
- multi-digit added pieces (docs/hazards.md#h12): pieces with two or more consecutive digits, which LLaMA's
  split_digits never produces, and how many tokens on the corpus are such pieces.

Tokenizers with the very same pieces in the same order (the paper's merge and the "exact" merge of
the same models differ only in the appended pieces' scores) are compared document by document: how
many documents one encodes differently from an earlier one. A folder holding a tokenizer.json is
checked against its own tokenizer.model: documents the fast tokenizer encodes differently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import to_dict
from .config import ReportConfig
from ..data.corpus import RecordReader, resolve_inputs
from ..errors import UserError
from ..files import check_file_output, check_not_input, write_atomic
from . import spm as spmio
from .merge import MULTI_DIGIT

BATCH = 512


@dataclass
class _Tally:
    name: str
    sp: object
    proto: object
    tokens: int = 0
    byte_tokens: int = 0
    unk_tokens: int = 0
    usage: list[int] = field(default_factory=list)
    same_pieces_as: list[int] = field(default_factory=list)  # earlier tallies with identical pieces
    differing: dict[int, int] = field(default_factory=dict)  # earlier tally -> documents encoded differently
    fast: object = None  # tokenizers.Tokenizer from the folder's tokenizer.json, if any
    fast_mismatches: int = 0


def unreachable_pieces(proto, start: int) -> list[int]:
    """Ids >= start whose surface text, encoded alone, is not that single piece."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    probe = pb.ModelProto()
    probe.CopyFrom(proto)
    # Encode surfaces exactly as written: no dummy "▁" in front, no whitespace clean-up.
    probe.normalizer_spec.add_dummy_prefix = False
    probe.normalizer_spec.remove_extra_whitespaces = False
    sp = spm.SentencePieceProcessor(model_proto=probe.SerializeToString())
    ids = list(range(start, len(proto.pieces)))
    surfaces = [proto.pieces[i].piece.replace("▁", " ") for i in ids]
    encoded = sp.encode(surfaces, num_threads=os.cpu_count() or 1)
    return [i for i, enc in zip(ids, encoded) if enc != [i]]


def report(cfg: ReportConfig) -> dict:
    if cfg.json_out:
        check_file_output(cfg.json_out, "report JSON")
        check_not_input(cfg.json_out, {"corpus": cfg.inputs, "tokenizer": cfg.tokenizers}, "report JSON")
    from . import backend

    if any(backend.detect(t) == "bpe" for t in cfg.tokenizers):
        from .bpe_report import report as report_bpe

        return report_bpe(cfg)
    tallies = []
    for t in cfg.tokenizers:
        proto = spmio.load_proto(t)
        sp = spmio.processor(t)
        tally = _Tally(t, sp, proto, usage=[0] * sp.get_piece_size())
        pieces = [p.piece for p in proto.pieces]
        tally.same_pieces_as = [j for j, o in enumerate(tallies) if [p.piece for p in o.proto.pieces] == pieces]
        tally.differing = {j: 0 for j in tally.same_pieces_as}
        tally.fast = _fast_tokenizer(t)
        tallies.append(tally)
    sources = resolve_inputs(cfg.inputs)
    reader = RecordReader(cfg.text_field, cfg.strict)
    threads = cfg.threads or os.cpu_count() or 1
    docs = chars = nbytes = 0
    batch: list[str] = []

    def flush() -> None:
        encoded = []
        for t in tallies:
            enc = t.sp.encode(batch, num_threads=threads)
            encoded.append(enc)
            for ids in enc:
                t.tokens += len(ids)
                u = t.usage
                for i in ids:
                    u[i] += 1
            for j in t.same_pieces_as:
                t.differing[j] += sum(1 for a, b in zip(enc, encoded[j]) if a != b)
            if t.fast is not None:
                fast = [e.ids for e in t.fast.encode_batch(batch, add_special_tokens=False)]
                t.fast_mismatches += sum(1 for a, b in zip(enc, fast) if a != b)
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

    ref = tallies[0]
    ref_pieces = [p.piece for p in ref.proto.pieces]
    rows = []
    for t in tallies:
        sp = t.sp
        byte_ids = [i for i, p in enumerate(t.proto.pieces) if p.type == spmio.BYTE]
        t.byte_tokens = sum(t.usage[i] for i in byte_ids)
        t.unk_tokens = t.usage[sp.unk_id()] if sp.unk_id() >= 0 else 0
        fp = spmio.fingerprint(t.name)
        row = {
            "tokenizer": t.name,
            "vocab_size": sp.get_piece_size(),
            "sha256": fp["sha256"],
            "file_sha256": fp["file_sha256"],
            "documents": docs,
            "characters": chars,
            "utf8_bytes": nbytes,
            "tokens": t.tokens,
            "tokens_per_char": t.tokens / chars,
            "byte_fallback_share": t.byte_tokens / max(t.tokens, 1),
            "unk_share": t.unk_tokens / max(t.tokens, 1),
            "reduction_vs_first": ref.tokens / max(t.tokens, 1),
        }
        if t.same_pieces_as:
            row["same_pieces_as"] = [{"tokenizer": tallies[j].name, "documents_encoded_differently": t.differing[j]}
                                     for j in t.same_pieces_as]
        if t.fast is not None:
            row["fast_tokenizer_documents_differing"] = t.fast_mismatches
        pieces = t.proto.pieces
        n = len(ref_pieces)
        if t is not ref and len(pieces) > n and all(pieces[i].piece == ref_pieces[i] for i in range(n)):
            added = range(n, len(pieces))
            unreachable = unreachable_pieces(t.proto, n)
            multi = [i for i in added if MULTI_DIGIT.search(pieces[i].piece)]
            row["extension_of_first"] = {
                "added": len(added),
                "unreachable": len(unreachable),
                "unreachable_examples": [pieces[i].piece for i in unreachable[:20]],
                "unused_on_corpus": sum(1 for i in added if t.usage[i] == 0),
                "added_token_share": sum(t.usage[i] for i in added) / max(t.tokens, 1),
                "multi_digit_pieces": len(multi),
                "multi_digit_examples": [pieces[i].piece for i in multi[:20]],
                "multi_digit_tokens_on_corpus": sum(t.usage[i] for i in multi),
            }
        rows.append(row)
    result = {"tokenizers": rows, "skipped": reader.skipped.as_dict(), "inputs": [s.path for s in sources],
              "config": to_dict(cfg)}
    if cfg.json_out:
        write_atomic(cfg.json_out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def format_table(result: dict) -> str:
    rows = result["tokenizers"]
    head = ["tokenizer", "vocab", "chars", "tokens", "tok/char", "byte-fb", "unk", "x fewer"]
    lines = []
    for r in rows:
        lines.append([
            _short(r["tokenizer"]), f"{r['vocab_size']:,}", f"{r['characters']:,}", f"{r['tokens']:,}",
            f"{r['tokens_per_char']:.3f}", f"{100 * r['byte_fallback_share']:.1f}%", f"{100 * r['unk_share']:.2f}%",
            f"{r['reduction_vs_first']:.2f}",
        ])
    widths = [max(len(head[i]), *(len(l[i]) for l in lines)) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    out += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(l, widths))) for l in lines]
    for r in rows:
        ext = r.get("extension_of_first")
        if ext:
            out.append("")
            out.append(f"{_short(r['tokenizer'])} extends {_short(rows[0]['tokenizer'])} by {ext['added']:,} pieces:")
            out.append(f"  unreachable (own surface text does not encode to the piece): {ext['unreachable']:,}"
                       + (f"  e.g. {ext['unreachable_examples'][:5]}" if ext["unreachable_examples"] else ""))
            out.append(f"  never emitted on this corpus: {ext['unused_on_corpus']:,}; added pieces are "
                       f"{100 * ext['added_token_share']:.1f}% of its tokens here")
            out.append(f"  multi-digit pieces (LLaMA splits digits): {ext['multi_digit_pieces']:,}, "
                       f"emitted {ext['multi_digit_tokens_on_corpus']:,} times here"
                       + (f"  e.g. {ext['multi_digit_examples'][:5]}" if ext["multi_digit_examples"] else ""))
    if any("round_trip_failures" in r for r in rows):
        from .bpe_report import format_lines

        for r in rows:
            out += ["", f"{_short(r['tokenizer'])} ({r.get('backend', 'bpe')}):", *format_lines(r)]
    for r in rows:
        lines = []
        for same in r.get("same_pieces_as", []):
            other = next(o for o in rows if o["tokenizer"] == same["tokenizer"])
            lines.append(f"{_short(r['tokenizer'])} has the pieces of {_short(same['tokenizer'])} with other scores: "
                         f"{same['documents_encoded_differently']:,} of {r['documents']:,} documents encoded "
                         f"differently; {r['tokens']:,} tokens vs {other['tokens']:,} "
                         f"({r['tokens_per_char']:.4f} vs {other['tokens_per_char']:.4f} a character)")
        if "fast_tokenizer_documents_differing" in r:
            lines.append(f"{_short(r['tokenizer'])}: tokenizer.json vs tokenizer.model: "
                         f"{r['fast_tokenizer_documents_differing']:,} of {r['documents']:,} documents encoded differently")
        if lines:
            out += ["", *lines]
    skipped = {k: v for k, v in result["skipped"].items() if v}
    if skipped:
        out.append(f"\nskipped records: {skipped}")
    return "\n".join(out)


def _short(path: str) -> str:
    p = Path(path)
    if p.name == spmio.MODEL_FILE:
        p = p.parent
    return p.name or str(p)


def _fast_tokenizer(path: str):
    """The folder's tokenizer.json as a tokenizers.Tokenizer, or None (no file, or no tokenizers library)."""
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p.parent / "tokenizer.json"
    if not f.is_file() or (not p.is_dir() and p.name != spmio.MODEL_FILE):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_file(str(f))
    except Exception as exc:
        raise UserError(f"{f} is not a tokenizers file that loads: {exc}") from None

