"""Load tokenizer folders written by `cllama tokenizer merge` with whatever transformers is installed, and
check them against SentencePiece: ids on real text, and decode.

    python tests/compat/check_hf_load.py --corpus zh.jsonl [--corpus more.jsonl] FOLDER [FOLDER ...]

Standalone on purpose (json, sentencepiece, transformers; no cllama_dist, no torch): it runs in the
separate transformers-4.x environment that tests/compat/run_tf4.sh creates, and in the project's own
transformers-5 environment. What each version must do with each layout (see cllama_dist/tokenizer/hf.py):

- fast layout (tokenizer.json present): AutoTokenizer, with and without use_fast, gives SentencePiece's
  ids with BOS in front, and decode gives SentencePiece's decode.
- SentencePiece layout (no tokenizer.json; tokenization_cllama.py named by auto_map):
  - 4.x and 5.x: AutoTokenizer with trust_remote_code=True gives the folder's class (SentencePiece's
    ids with BOS in front; decode gives SentencePiece's decode, byte-fallback pieces as characters, and
    with special tokens kept, SentencePiece's decode with their text in place), also from a copy of
    the folder with a LLaMA config.json, as an exported model holds it;
  - 5.x without trust_remote_code: the stock SentencePieceBackend with SentencePiece's ids (its decode
    leaves byte pieces as "<0x..>": reported, not failed on);
  - 4.x without trust_remote_code: AutoTokenizer refuses the folder, asking for trust_remote_code
    (its stock choice would be an inexact fast tokenizer), and LlamaTokenizer.from_pretrained gives
    SentencePiece's ids and decode.

Prints one JSON object; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
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

    # Texts whose SentencePiece encoding holds byte-fallback pieces: what the stock 5.x decode gets wrong.
    byte_texts = [t for t, ids in zip(texts, sp.encode(texts)) if any(sp.is_byte(i) for i in ids)]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")  # the folder as an exported model holds it, beside a LLaMA config.json
        shutil.copytree(folder, model_dir)
        (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                           "vocab_size": sp.get_piece_size()}))
        for where, path in (("folder", folder), ("model folder", model_dir)):
            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
            code = type(tok).__module__.startswith("transformers_modules.")
            # Every byte-fallback text is decoded; of the rest, in 4.x, the first 300 documents (its slow
            # class decodes about 100 documents a second: it rebuilds its special-token list for every token).
            r = compare(tok, sp, texts if where == "folder" else EXTRA,
                        decode_first=300 if major < 5 and where == "folder" else None)
            b = compare(tok, sp, byte_texts)
            # With special tokens kept, their text in place, and without it SentencePiece's decode of the
            # whole sequence (spaces included after a special token).
            bos, eos = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id())
            kept = []
            for t in EXTRA:
                full = [sp.bos_id()] + sp.encode(t) + [sp.eos_id()] + sp.encode(t)
                got = tok.decode(full)
                if not got.startswith(bos) or got.count(eos) != 1 or \
                        got.replace(bos, "").replace(eos, "") != sp.decode(full):
                    kept.append({"text": t, "got": got, "want": sp.decode(full)})
            record(f"AutoTokenizer(trust_remote_code=True), {where}", code and r["ids_differ"] == 0
                   and r["decode_differs"] == 0 and b["decode_differs"] == 0 and not kept and len(byte_texts) > 0
                   and len(tok) == sp.get_piece_size(), cls=type(tok).__name__, module=type(tok).__module__,
                   size=len(tok), byte_fallback_texts=len(byte_texts), byte_fallback_decoded=b["decoded"],
                   byte_decode_differs=b["decode_differs"], special_kept_differs=kept[:3], **r)
        # save_pretrained (what a trainer does with its tokenizer) writes a folder that loads back the same way.
        tok.save_pretrained(str(Path(tmp, "saved")))
        again = AutoTokenizer.from_pretrained(str(Path(tmp, "saved")), trust_remote_code=True)
        saved = json.loads(Path(tmp, "saved", "tokenizer_config.json").read_text(encoding="utf-8"))
        r = compare(again, sp, EXTRA)
        record("save_pretrained, then AutoTokenizer(trust_remote_code=True)", type(again).__name__ == type(tok).__name__
               and type(again).__module__.startswith("transformers_modules.") and r["ids_differ"] == 0
               and r["decode_differs"] == 0 and saved["tokenizer_class"] == "SentencePieceBackend",
               cls=type(again).__name__, saved_tokenizer_class=saved["tokenizer_class"], **r)

    if major >= 5:
        tok = AutoTokenizer.from_pretrained(str(folder))
        r = compare(tok, sp, texts, decode=lambda ids: tok.sp_model.decode(ids))
        record("AutoTokenizer, no trust_remote_code (ids; decode via sp_model.decode)",
               type(tok).__module__.startswith("transformers.") and type(tok).__name__ == "SentencePieceBackend"
               and r["ids_differ"] == 0 and r["decode_differs"] == 0 and len(tok) == sp.get_piece_size(),
               cls=type(tok).__name__, size=len(tok), **r)
        stock = compare(tok, sp, byte_texts)
        record("stock decode of byte-fallback pieces, no trust_remote_code (informational)", True,
               decode_differs=stock["decode_differs"], of=len(byte_texts), decode_examples=stock["decode_examples"])
        return results

    from transformers import LlamaTokenizer

    try:
        with contextlib.redirect_stdout(sys.stderr):  # its question goes to stdout, which is this script's JSON
            tok = AutoTokenizer.from_pretrained(str(folder))
        record("AutoTokenizer refuses without trust_remote_code", False, cls=type(tok).__name__,
               why="4.x AutoTokenizer loaded a class for a folder no fast tokenizer can reproduce")
    except ValueError as exc:
        record("AutoTokenizer refuses without trust_remote_code", "trust_remote_code=True" in str(exc),
               error=str(exc)[-200:])
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

    # 4.x asks on the terminal whether to run a folder's code when trust_remote_code is not given; no
    # terminal here, so that it refuses at once, as a service would.
    sys.stdin = open(os.devnull)
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
