"""Train a new-language byte-level BPE with a base's own normalizer and pre-tokenizer.

    cllama tokenizer train --base llama3/ --inputs corpus/ --output out/zh_bpe --vocab-size 20000

The corpus is streamed and sampled exactly as for SentencePiece (train.py: sentences, seeded reservoir, memory
bounded by the sample). The learned pre-tokens are the base's, so every learned token is one the base's
pre-tokenizer can hand to the BPE model; `cllama tokenizer merge` then appends the merges that hold the new
script. Writes PREFIX.json (a tokenizers file) and PREFIX.report.json.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..config import to_dict
from ..data.corpus import RecordReader, resolve_inputs
from ..errors import UserError
from ..files import check_file_output, check_not_input, write_atomic
from ..progress import Progress
from . import bpe
from .config import TokenizerTrainConfig
from .sample import CJK, Reservoir, split_sentences


def trainer_for(base_tok, vocab_size: int):
    """An empty BPE tokenizer with the base's normalizer, pre-tokenizer and decoder, and its trainer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    doc = json.loads(base_tok.to_str())
    model = doc["model"]
    tok = Tokenizer(models.BPE(byte_fallback=bool(model.get("byte_fallback")), fuse_unk=False))
    probe = json.loads(tok.to_str())
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        probe[key] = doc.get(key)
    tok = Tokenizer.from_str(json.dumps(probe))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    return tok, trainer


def train(cfg: TokenizerTrainConfig) -> dict:
    out_json = Path(f"{cfg.output}.json")
    for path in (out_json, Path(f"{cfg.output}.report.json")):
        check_file_output(path, "tokenizer")
        check_not_input(path, {"corpus": cfg.inputs}, "tokenizer")
    base_tok, info = bpe.load(cfg.base, "base tokenizer", cfg.split_pattern)
    if "ByteLevel" not in (json.dumps(json.loads(base_tok.to_str()).get("pre_tokenizer"))):
        raise UserError(f"the base {info['file']} has no ByteLevel pre-tokenizer: only byte-level BPE bases can be "
                        "extended by continued BPE")
    sources = resolve_inputs(cfg.inputs)
    reader = RecordReader(cfg.text_field, cfg.strict)
    sample = Reservoir(cfg.sample_sentences, cfg.seed)
    docs = chars = cjk_docs = 0
    total_bytes = sum(s.size for s in sources)
    t0 = time.time()
    with Progress("sampling sentences", total=total_bytes, unit="B") as bar:
        for src in sources:
            for doc in reader.read(src):
                docs += 1
                chars += len(doc.text)
                cjk_docs += bool(CJK.search(doc.text))
                for sentence in split_sentences(doc.text, cfg.max_sentence_chars):
                    sample.add(sentence)
            bar.update(src.size)
    t_sample = time.time() - t0
    if docs == 0:
        raise UserError(f"the corpus ({len(sources)} file(s)) holds no usable document")
    sentences = sorted(sample.items)
    tok, trainer = trainer_for(base_tok, cfg.vocab_size)
    t1 = time.time()
    tok.train_from_iterator(sentences, trainer=trainer, length=len(sentences))
    t_train = time.time() - t1
    text = tok.to_str(pretty=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_json, text)
    report = {
        "backend": "bpe",
        "model": str(out_json),
        "base": {"path": info["file"], "layout": info["layout"], **bpe.fingerprint(base_tok)},
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "vocab_size": tok.get_vocab_size(),
        "inputs": [s.path for s in sources],
        "input_bytes": total_bytes,
        "documents_seen": docs,
        "documents_with_chinese": cjk_docs,
        "characters_seen": chars,
        "sentences_seen": sample.seen,
        "sentences_sampled": len(sentences),
        "characters_sampled": sum(len(s) for s in sentences),
        "skipped": reader.skipped.as_dict(),
        "seconds_sampling": round(t_sample, 3),
        "seconds_training": round(t_train, 3),
        "config": to_dict(cfg),
    }
    write_atomic(f"{cfg.output}.report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
