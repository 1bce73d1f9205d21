"""Continued BPE: append a new-language byte-level BPE to a base's, every base id and base-language encoding kept.

    cllama tokenizer merge --base llama3/ --add zh_bpe.json --out merged/

The base's vocabulary, merges, normalizer, pre-tokenizer, decoder and added/special tokens stay as they are.
The added tokenizer's merges are walked in its learned order and one is appended (after every base merge, so
base merges always win) when
- its result holds the new script (script.py: Han by default, `--script`), so it can only fire in text that
  holds that script: text without it (English, code, numbers) encodes exactly as under the base;
- its result is not a base token already, and both its parts exist (base tokens or earlier appended results).
New ids start after every id in use, added and special tokens included (Llama 3: 128,256), or at
`--first-new-id`. `tokenizers` gives an added token that is not in `model.vocab` the next free id at load time
(DESIGN B3), so the base's added tokens are written into `model.vocab` at their own ids, and every id is
verified by loading the written file.
New tokens that their own text does not produce (shadowed by base merges, or by `ignore_merges`' whole-word
lookup) are dropped by default, with the merges that need them, until none is left (`--keep-unreachable`
keeps and counts them). Partial-character tokens that only build other new tokens are kept as intermediates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .. import __version__
from ..config import to_dict
from ..errors import UserError
from . import bpe
from .bpe_checks import base_language_texts, changed_ids, round_trip_failures
from .bpe_folder import check_output, publish, write_hf_files
from .config import MergeConfig
from .script import ScriptRule, token_bytes


def _select(base_vocab: dict, add_merges: list[tuple[str, str]], rule: ScriptRule) -> tuple[list, dict]:
    """The add merges to append, in order, and why the others were not."""
    have = set(base_vocab)
    chosen = []
    stats = {"already_in_base": 0, "duplicate": 0, "not_in_script": 0, "missing_part": 0, "not_byte_level": 0}
    for a, b in add_merges:
        r = a + b
        if r in have:
            stats["already_in_base" if r in base_vocab else "duplicate"] += 1
            continue
        if a not in have or b not in have:
            stats["missing_part"] += 1
            continue
        rb = token_bytes(r)
        if rb is None:
            stats["not_byte_level"] += 1
            continue
        if not rule.holds_script(rb):
            stats["not_in_script"] += 1
            continue
        have.add(r)
        chosen.append((a, b))
    return chosen, stats


def _is_text(token: str) -> str | None:
    b = token_bytes(token)
    try:
        return b.decode("utf-8") if b is not None else None
    except UnicodeDecodeError:
        return None


def _prune(merges: list[tuple[str, str]], drop: set[str]) -> list[tuple[str, str]]:
    """Remove merges producing dropped tokens, merges that need a removed result, and intermediates nothing needs."""
    removed = set(drop)
    kept = []
    for a, b in merges:
        if a + b in removed or a in removed or b in removed:
            removed.add(a + b)
            continue
        kept.append((a, b))
    # Partial-character intermediates: keep only those some kept text token is built from.
    parts: dict[str, list[str]] = {}  # a rescue merge makes a second pair for one token
    for a, b in kept:
        parts.setdefault(a + b, []).extend((a, b))
    needed = {r for r in parts if _is_text(r) is not None}
    stack = list(needed)
    while stack:
        for part in parts[stack.pop()]:
            if part in parts and part not in needed:
                needed.add(part)
                stack.append(part)
    return [(a, b) for a, b in kept if a + b in needed]


def build(base_tok, merges: list[tuple[str, str]], first_id: int, pair_style: bool):
    """The merged tokenizer.json text and the new tokens' ids."""
    from tokenizers import Tokenizer

    doc = json.loads(base_tok.to_str())
    model = doc["model"]
    vocab = model["vocab"]
    # B3: an added token missing from model.vocab is renumbered on load; put it there at its own id.
    for a in doc.get("added_tokens", []):
        if a["content"] not in vocab:
            vocab[a["content"]] = a["id"]
    new_ids: dict[str, int] = {}
    for a, b in merges:
        if a + b not in vocab:  # a rescue merge builds a token that already has its id
            new_ids[a + b] = vocab[a + b] = first_id + len(new_ids)
    base_merges = bpe.merge_pairs(model["merges"])
    all_merges = base_merges + merges
    model["merges"] = [[a, b] for a, b in all_merges] if pair_style else [f"{a} {b}" for a, b in all_merges]
    text = json.dumps(doc, ensure_ascii=False, indent=2)
    return Tokenizer.from_str(text), text, new_ids


def unreachable(tok, new_ids: dict[str, int]) -> list[str]:
    """New text tokens whose own text, encoded alone, is not that one token."""
    items = [(t, _is_text(t)) for t in new_ids]
    items = [(t, s) for t, s in items if s is not None]
    enc = tok.encode_batch([s for _, s in items], add_special_tokens=False)
    return [t for (t, _), e in zip(items, enc) if e.ids != [new_ids[t]]]


def verify_ids(path: Path, base_tok, new_ids: dict[str, int]) -> None:
    """Load the written file and check every base token, added token and new token has its planned id."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    want = dict(base_tok.get_vocab(with_added_tokens=True))
    want.update(new_ids)
    wrong = [(t, i, vocab.get(t)) for t, i in want.items() if vocab.get(t) != i]
    if wrong or len(vocab) != len(want):
        raise RuntimeError(f"the written {path} loads with other ids ({len(wrong)} tokens moved, e.g. {wrong[:3]}; "
                           f"{len(vocab)} vs {len(want)} tokens); this is a bug")
    ids = sorted(want.values())
    if len(set(ids)) != len(ids):
        raise RuntimeError("two tokens share an id; this is a bug")


def merge(cfg: MergeConfig) -> dict:
    """Write the merged BPE tokenizer folder; returns the merge report."""
    from . import backend

    if backend.detect(cfg.add) != "bpe":
        f = bpe.tokenizer_file(cfg.base)
        what = "a JSON file (a byte-level BPE tokenizer.json)" if f.suffix == ".json" else "a byte-level BPE tokenizer"
        raise UserError(f"the base {f} is {what}, not a SentencePiece model, while --add {cfg.add} is one: give a "
                        "SentencePiece base (LLaMA's tokenizer.model), or train the new vocabulary with `cllama tokenizer "
                        "train --base BASE` (it writes PREFIX.json) and add that")
    check_output(cfg, Path(cfg.out))  # before a minute of work
    t0 = time.time()
    base_tok, info = bpe.load(cfg.base, "base tokenizer", cfg.split_pattern)
    add_tok, _ = bpe.load(cfg.add, "tokenizer to add")
    base_doc = json.loads(base_tok.to_str())
    add_doc = json.loads(add_tok.to_str())
    add_model = add_doc["model"]
    for key in ("normalizer", "pre_tokenizer"):
        if add_doc.get(key) != base_doc.get(key):
            raise UserError(f"--add {bpe.tokenizer_file(cfg.add)} was trained with another {key.replace('_', '-')} than "
                            f"the base {info['file']}, so its tokens may never match: retrain it with `cllama tokenizer "
                            f"train --base {cfg.base}`")
    rule = ScriptRule(cfg.script)
    base_vocab = base_doc["model"]["vocab"]
    used = set(base_vocab.values()) | set(base_tok.get_added_tokens_decoder())
    first_id = max(used) + 1
    if cfg.first_new_id:
        if cfg.first_new_id < first_id:
            raise UserError(f"--first-new-id {cfg.first_new_id} collides with the base's ids (in use up to {first_id - 1}); "
                            f"use {first_id} or more")
        first_id = cfg.first_new_id
    chosen, stats = _select(base_vocab, bpe.merge_pairs(add_model.get("merges", [])), rule)
    pair_style = _pair_style(info) or any(" " in a or " " in b for a, b in chosen)
    merges = _prune(chosen, set())
    dropped: list[str] = []
    rounds = 0
    rescued = 0
    while True:
        tok, text, new_ids = build(base_tok, merges, first_id, pair_style)
        bad = unreachable(tok, new_ids)
        if not bad or cfg.keep_unreachable or rounds >= 16:
            break
        rounds += 1
        # A token whose own text ends as two tokens that make it (base merges took its bytes another way) is
        # rescued by one more merge of those two: it holds the script, so base-language text stays as it was.
        have = set(merges)
        rescue, drop = [], set()
        for t, e in zip(bad, tok.encode_batch([_is_text(t) for t in bad], add_special_tokens=False)):
            pair = tuple(e.tokens)
            if len(pair) == 2 and pair[0] + pair[1] == t and pair not in have:
                rescue.append(pair)
                have.add(pair)
            else:
                drop.add(t)
        # Rescues first: a token built on a rescued one may become reachable with it.
        if rescue:
            rescued += len(rescue)
            merges = merges + rescue
        else:
            dropped += sorted(drop, key=lambda t: new_ids[t])
            merges = _prune(merges, drop)
    texts = base_language_texts()
    changed = changed_ids(base_tok, tok, texts, rule)
    if any(changed.values()):
        raise RuntimeError(f"appended merges changed base-language encodings {changed}; this is a bug")
    own_texts = [s for s in (_is_text(t) for t in new_ids) if s]
    trips = round_trip_failures(tok, own_texts + [t for group in texts.values() for t in group])
    report = {
        "tool": f"cllama-dist {__version__}",
        "backend": "bpe",
        "base": {"path": info["file"], "layout": info["layout"], **bpe.fingerprint(base_tok)},
        "add": {"path": str(bpe.tokenizer_file(cfg.add)), **bpe.fingerprint(add_tok)},
        "orig_vocab_size": base_tok.get_vocab_size(with_added_tokens=True),
        "first_new_id": first_id,
        "new_vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "added": len(new_ids),
        "added_intermediate": sum(1 for t in new_ids if _is_text(t) is None),
        "add_merges": len(add_model.get("merges", [])),
        "skipped": stats,
        "script": cfg.script,
        "unreachable_dropped": len(dropped),
        "unreachable_dropped_examples": [_is_text(t) for t in dropped[:20]],
        "unreachable_kept": len(unreachable(tok, new_ids)),
        "rescue_merges": rescued,
        "overlap": stats["already_in_base"],
        "base_language_changed": changed,
        "base_language_texts": {k: len(v) for k, v in texts.items()},
        "round_trip_failures": trips,
        "ignore_merges": bool(base_doc["model"].get("ignore_merges")),
        "merges_serialisation": "pairs" if pair_style else "strings",
        "notes": [],
        "config": to_dict(cfg),
    }
    if report["unreachable_kept"]:
        report["notes"].append(f"{report['unreachable_kept']} new tokens are never produced by their own text "
                               f"({'kept: --keep-unreachable' if cfg.keep_unreachable else 'left after 16 rounds'})")

    def write(tmp: Path) -> None:
        (tmp / bpe.TOKENIZER_JSON).write_text(text, encoding="utf-8")
        verify_ids(tmp / bpe.TOKENIZER_JSON, base_tok, new_ids)
        report["hf_folder"] = write_hf_files(tmp, tok, info)
        report["fingerprint"] = bpe.fingerprint(tok)
        report["seconds"] = round(time.time() - t0, 2)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    publish(cfg, Path(cfg.out), write)
    return report


def _pair_style(info: dict) -> bool:
    """Keep the base file's merges serialisation ("a b" strings load in older tokenizers, too)."""
    if info.get("layout") != "tokenizer.json":
        return True
    try:
        with open(info["file"], encoding="utf-8") as f:
            merges = json.load(f).get("model", {}).get("merges", [])
    except (OSError, ValueError):
        return True
    return not (merges and isinstance(merges[0], str))
