"""Load tokenizer folders written by `cllama tokenizer merge` with whatever transformers is installed, and
check them against SentencePiece: ids on real text, and decode.

    python tests/compat/check_hf_load.py --corpus zh.jsonl [--corpus more.jsonl] FOLDER [FOLDER ...]

Standalone on purpose (json, sentencepiece, transformers; no cllama_dist, no torch): it runs in the
separate transformers-4.x environment that tests/compat/run_tf4.sh creates, and in the project's own
transformers-5 environment. What each version must do with each layout (see cllama_dist/tokenizer/hf.py):

- fast layout (tokenizer.json present): AutoTokenizer, with and without use_fast, gives SentencePiece's
  ids with BOS in front, and decode gives SentencePiece's decode.
- SentencePiece layout (no tokenizer.json):
  - 5.x: AutoTokenizer gives SentencePieceBackend with SentencePiece's ids; `sp_model.decode` gives
    SentencePiece's decode (its stock decode leaves byte pieces as "<0x..>": transformers #47473,
    reported here, not failed on);
  - 4.x: AutoTokenizer refuses the folder (it would build an inexact fast tokenizer), and
    LlamaTokenizer.from_pretrained gives SentencePiece's ids and decode.

Prints one JSON object; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# Characters that fall back to bytes in LLaMA-style tokenizers, spaces at the edges, tabs, newlines.
EXTRA = ["𠀀", "龘", "😀 表情符号", "𠀀龘😀 人工智能", "鱻麤靐齉", " 开头有空格", "  两个空格", "末尾空格 ",
         "a  b   c", "\t制表符\n换行\n\n", "数字 12345 和 ６７８", "Hello, world!"]


def texts_from(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        for line in Path(p).read_text(encoding="utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line)["text"])
    return out + EXTRA


def compare(tok, sp, texts: list[str], decode=None, decode_first: int | None = None) -> dict:
    """Documents whose ids (BOS + SentencePiece's) or decode (SentencePiece's) differ.

    ``decode_first``: decode only the extra texts and this many documents (4.x's slow LlamaTokenizer
    decodes at about 100 documents a second: it rebuilds its special-token list for every token).
    """
    bos = [sp.bos_id()] if sp.bos_id() >= 0 else []
    want = sp.encode(texts)
    got = tok(texts)["input_ids"]
    bad_ids = [i for i, (a, b) in enumerate(zip(want, got)) if b != bos + a]
    decode = decode or (lambda ids: tok.decode(ids, skip_special_tokens=True))
    which = range(len(texts)) if decode_first is None else \
        [*range(min(decode_first, len(texts))), *range(len(texts) - len(EXTRA), len(texts))]
    bad_dec = [i for i in sorted(set(which)) if decode(bos + want[i]) != sp.decode(want[i])]
    return {"texts": len(texts), "decoded": len(set(which)), "ids_differ": len(bad_ids), "decode_differs": len(bad_dec),
            "ids_examples": [texts[i][:40] for i in bad_ids[:3]], "decode_examples": [
                {"text": texts[i][:40], "got": decode(bos + want[i])[:60], "want": sp.decode(want[i])[:60]}
                for i in bad_dec[:3]]}


def check_folder(folder: Path, texts: list[str], major: int) -> list[dict]:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    layout = "fast" if (folder / "tokenizer.json").is_file() else "sentencepiece"
    results = []

    def record(name: str, ok: bool, **info) -> None:
        results.append({"folder": str(folder), "layout": layout, "check": name, "ok": ok, **info})

    if layout == "fast":
        # 5.x ignores use_fast (tokenization_auto.py: "V5: Always use fast tokenizers"); 4.x honours it.
        for kw in ({}, {"use_fast": False}) if major < 5 else ({},):
            tok = AutoTokenizer.from_pretrained(str(folder), **kw)
            r = compare(tok, sp, texts)
            record(f"AutoTokenizer{kw or ''}", r["ids_differ"] == 0 and r["decode_differs"] == 0 and
                   len(tok) == sp.get_piece_size(), cls=type(tok).__name__, size=len(tok), **r)
        return results

    if major >= 5:
        tok = AutoTokenizer.from_pretrained(str(folder))
        r = compare(tok, sp, texts, decode=lambda ids: tok.sp_model.decode(ids))
        record("AutoTokenizer (ids; decode via sp_model.decode)", type(tok).__name__ == "SentencePieceBackend"
               and r["ids_differ"] == 0 and r["decode_differs"] == 0 and len(tok) == sp.get_piece_size(),
               cls=type(tok).__name__, size=len(tok), **r)
        stock = compare(tok, sp, EXTRA)
        record("stock decode of byte-fallback pieces (transformers #47473; informational)", True,
               decode_differs=stock["decode_differs"], decode_examples=stock["decode_examples"])
        return results

    from transformers import LlamaTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
        record("AutoTokenizer refuses", False, cls=type(tok).__name__,
               why="4.x AutoTokenizer loaded a class for a folder no fast tokenizer can reproduce")
    except ValueError as exc:
        record("AutoTokenizer refuses", "SentencePieceBackend" in str(exc), error=str(exc)[:200])
    tok = LlamaTokenizer.from_pretrained(str(folder))
    r = compare(tok, sp, texts, decode_first=300)
    record("LlamaTokenizer.from_pretrained", r["ids_differ"] == 0 and r["decode_differs"] == 0
           and len(tok) == sp.get_piece_size(), cls=type(tok).__name__, size=len(tok), **r)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--corpus", action="append", default=[], help="JSON Lines with a text field")
    args = ap.parse_args(argv)
    import transformers

    t0 = time.time()
    major = int(transformers.__version__.split(".")[0])
    texts = texts_from(args.corpus)
    results = [r for f in args.folders for r in check_folder(f, texts, major)]
    summary = {"transformers": transformers.__version__, "torch_imported": "torch" in sys.modules,
               "seconds": round(time.time() - t0, 1), "ok": all(r["ok"] for r in results), "results": results}
    print(json.dumps(summary, ensure_ascii=False, indent=1))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
