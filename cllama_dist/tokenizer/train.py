"""Train a new-language SentencePiece model from a corpus of any size.

    cllama tokenizer train --inputs corpus/ --output out/chinese_sp --vocab-size 20000

The corpus is streamed once. Documents are cut into sentences (lines, then sentence punctuation, then
a hard cut at ``max_sentence_chars``), and a seeded reservoir keeps a uniform sample of at most
``sample_sentences`` of them: memory depends on the sample, never on the corpus (the paper trained
on 20 GB). SentencePiece is fed from that sample through its sentence iterator.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

from ..config import to_dict
from .config import TokenizerTrainConfig
from ..data.corpus import RecordReader, resolve_inputs
from ..errors import UserError
from ..files import check_file_output, check_not_input, write_atomic
from ..progress import Progress
from .sample import CJK, Reservoir, split_sentences

_TOO_HIGH = re.compile(r"Vocabulary size (?:is )?too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def train(cfg: TokenizerTrainConfig) -> dict:
    """Train and write PREFIX.model / PREFIX.vocab / PREFIX.report.json; returns the report."""
    import sentencepiece as spm

    if cfg.base:
        from .bpe_train import train as train_bpe

        return train_bpe(cfg)
    # The outputs are checked before an hour of sampling: not folders, and not inside a corpus folder (a
    # PREFIX.report.json there would be read as corpus next time), nor over a corpus file.
    for suffix in (".model", ".vocab", ".report.json"):
        check_file_output(f"{cfg.output}{suffix}", "tokenizer")
        check_not_input(f"{cfg.output}{suffix}", {"corpus": cfg.inputs}, "tokenizer")
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
                if CJK.search(doc.text):
                    cjk_docs += 1
                for sentence in split_sentences(doc.text, cfg.max_sentence_chars):
                    sample.add(sentence)
            bar.update(src.size)
    t_sample = time.time() - t0
    if docs == 0:
        raise UserError(
            f"the corpus ({len(sources)} file(s)) holds no usable document; skipped: "
            f"{ {k: v for k, v in reader.skipped.as_dict().items() if v} }"
        )
    if cjk_docs == 0:
        raise UserError(
            f"the corpus holds no Chinese text: none of its {docs} documents contains a CJK ideograph "
            f"(first file: {sources[0].path}); is this the right corpus or --text-field?"
        )

    out_prefix = Path(cfg.output)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    threads = cfg.threads or os.cpu_count() or 1
    spm.set_random_generator_seed(cfg.seed)
    # Sorting makes the input order, and so the model, independent of reservoir replacement order.
    sentences = sorted(sample.items)
    t1 = time.time()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=str(out_prefix),
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            character_coverage=cfg.character_coverage,
            normalization_rule_name=cfg.normalization,
            split_digits=cfg.split_digits,
            num_threads=threads,
            input_sentence_size=0,  # already sampled
            shuffle_input_sentence=False,
            # Bytes, not characters: a CJK character is 3 UTF-8 bytes.
            max_sentence_length=4 * cfg.max_sentence_chars + 16,
            train_extremely_large_corpus=len(sentences) > 10_000_000,
            minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc)
        m = _TOO_HIGH.search(msg)
        if m:
            raise UserError(
                f"vocab_size {cfg.vocab_size} is larger than this corpus supports for a {cfg.model_type} "
                f"model: the largest that works is {m.group(2)} (use more text or --vocab-size {m.group(2)})"
            ) from None
        m = _TOO_SMALL.search(msg)
        if m:
            raise UserError(
                f"vocab_size {cfg.vocab_size} is smaller than the {m.group(2)} pieces needed for the characters "
                f"that character_coverage {cfg.character_coverage} must cover (plus control pieces): use "
                f"--vocab-size {m.group(2)} or more, or lower --character-coverage"
            ) from None
        raise UserError(f"SentencePiece training failed: {msg}") from None
    t_train = time.time() - t1
    model_file = Path(f"{out_prefix}.model")
    report = {
        "model": str(model_file),
        "vocab": f"{out_prefix}.vocab",
        "sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
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
    write_atomic(f"{out_prefix}.report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
