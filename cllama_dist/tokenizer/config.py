"""Settings of the vocabulary stage: train a SentencePiece model, merge it into the base, report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import PathStr, Section, check, option, require
from ..data.config import CorpusConfig


@dataclass
class TokenizerTrainConfig(CorpusConfig):
    """Train a new-language SentencePiece model on a corpus (cllama tokenizer train)."""

    output: PathStr = option("chinese_sp", "Output prefix: writes PREFIX.model, PREFIX.vocab and PREFIX.report.json.",
                             aliases=["--out", "--model-prefix"])
    vocab_size: int = option(20000, "Number of pieces of the new tokenizer (the paper: 20,000).")
    model_type: Literal["bpe", "unigram"] = option(
        "bpe", "SentencePiece algorithm. The paper's released chinese_sp.model is unigram; BPE is the default "
               "because the merged tokenizer runs LLaMA's BPE algorithm, under which unigram-trained pieces are "
               "often unreachable (measured on the fixture corpus: 2,315 of 18,507 added unigram pieces "
               "against 12 of 18,466 BPE pieces), and BPE compresses held-out text slightly better.")
    character_coverage: float = option(0.9995, "Share of characters covered by the vocabulary (the paper: 0.9995).")
    normalization: str = option(
        "identity", "SentencePiece normalization rule. 'identity' (LLaMA's) by default: the merged tokenizer keeps "
                    "the base's normalizer, so pieces learned under another rule may never match real text (the "
                    "paper's model used nmt_nfkc, which learns ',' where Chinese text has '，').")
    split_digits: bool = option(
        False, "Split numbers into single digits, as LLaMA does. Off in the paper's model, whose multi-digit "
               "pieces (e.g. '▁2004') then make the merged tokenizer emit multi-digit tokens although LLaMA "
               "splits digits.")
    sample_sentences: int = option(
        2_000_000, "Size of the seeded reservoir sample of sentences fed to SentencePiece. Memory is bounded by "
                   "this and max_sentence_chars, never by the corpus size.")
    max_sentence_chars: int = option(1000, "Longer lines are cut at sentence punctuation, then hard, to at most "
                                           "this many characters.")
    threads: int = option(0, "SentencePiece training threads (0: all cores).")
    seed: int = option(42, "Seed of the sentence sample and of SentencePiece's random generator.")
    base: PathStr = option(
        "", "A byte-level BPE base (folder or tokenizer.json / tiktoken / GGUF file): train a byte-level BPE with the "
            "base's normalizer and pre-tokenizer instead of a SentencePiece model, written to PREFIX.json. Empty: "
            "SentencePiece.")
    split_pattern: str = option("", "Split pattern of a tiktoken base of no known layout (its pat_str).")

    def validate(self) -> None:
        super().validate()
        check(self.vocab_size >= 10, "vocab_size", f"must be at least 10, got {self.vocab_size}")
        check(0.9 <= self.character_coverage <= 1.0, "character_coverage",
              f"must be within [0.9, 1.0], got {self.character_coverage}")
        check(self.sample_sentences >= 1, "sample_sentences", f"must be positive, got {self.sample_sentences}")
        check(self.max_sentence_chars >= 16, "max_sentence_chars", f"must be at least 16, got {self.max_sentence_chars}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")


@dataclass
class MergeConfig(Section):
    """Append a SentencePiece model's new pieces to a base tokenizer, keeping base ids (cllama tokenizer merge)."""

    base: PathStr = option("", "The base SentencePiece model (LLaMA's tokenizer.model), or a folder holding tokenizer.model.")
    add: PathStr = option("", "The SentencePiece model whose pieces are added (e.g. the 20K Chinese model).")
    out: PathStr = option("", "Output folder: tokenizer.model, Hugging Face tokenizer files, merge_report.json.")
    new_piece_score: Literal["paper", "exact", "below-base"] = option(
        "paper", "Score of appended pieces. 'paper': 0, as the paper's script did (above every LLaMA piece, so they "
                 "merge first; tied, so SentencePiece breaks ties by position and no exact tokenizer.json exists: the "
                 "folder is SentencePiece-only, byte-identical to the published Chinese-LLaMA tokenizer). 'exact': "
                 "distinct scores above every base score, in the added model's order: merged first like 'paper', but "
                 "a merges list reproduces it, so an exact tokenizer.json is written that transformers 4.x and 5.x "
                 "load; encodings differ from the published tokenizer's on most Chinese documents, token count within "
                 "0.1%. 'below-base': distinct scores under the lowest base score, so base merges win; gets an exact "
                 "tokenizer.json when the base allows.")
    drop_multi_digit: bool = option(
        False, "Do not add pieces containing two or more consecutive digits, keeping LLaMA's one-digit "
               "convention. Off by default: the published tokenizer keeps them.")
    overwrite: bool = option(False, "Replace an existing output folder.")
    script: str = option(
        "Han", "Byte-level BPE bases: append only merges whose result holds a character of this Unicode script "
               "(or regex character class, e.g. '[\\p{Han}\\p{Bopomofo}]'), so text without it encodes as under the base.")
    first_new_id: int = option(0, "Byte-level BPE bases: id of the first new token (0: after every id in use, added "
                                  "and special tokens included).")
    keep_unreachable: bool = option(False, "Byte-level BPE bases: keep new tokens their own text does not produce "
                                           "(counted in the report) instead of dropping them.")
    split_pattern: str = option("", "Split pattern of a tiktoken base of no known layout (its pat_str).")

    def validate(self) -> None:
        require(self, "base", "add", "out")
        check(self.first_new_id >= 0, "first_new_id", f"must be >= 0, got {self.first_new_id}")


@dataclass
class ReportConfig(CorpusConfig):
    """Compare tokenizers on a corpus (cllama tokenizer report)."""

    tokenizers: list[PathStr] = option(
        [], "Tokenizers to compare (SentencePiece .model files or folders holding tokenizer.model); the first is "
            "the reference for ratios, and a later one whose first pieces equal it is analysed as its extension.",
        aliases=["--tokenizer"])
    json_out: PathStr = option("", "Write the figures as JSON to this path.")
    threads: int = option(0, "Encoding threads (0: all cores).")
    max_documents: int = option(0, "Stop after this many documents (0: all).")

    def validate(self) -> None:
        super().validate()
        check(bool(self.tokenizers), "tokenizers", "give at least one tokenizer")
        check(bool(self.inputs), "inputs", "give the corpus (--inputs)")
        check(self.threads >= 0 and self.max_documents >= 0, "threads", "threads and max_documents must be >= 0")
