"""SentencePiece's own encoding and decoding behind AutoTokenizer, in transformers 4.x and 5.x.

Written by cllama-dist (``cllama tokenizer merge``) next to ``tokenizer.model``, and named by
``tokenizer_config.json``'s ``auto_map``; loaded with

    AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)

Why a file of code: this folder's model gives every appended piece the same score, and SentencePiece's
BPE breaks such ties by position, which no ``tokenizer.json`` merges list can do; so the only exact
encoder is SentencePiece itself. transformers 5 has one stock class that encodes with it,
``SentencePieceBackend``, but its ``decode`` joins piece strings and prints byte-fallback pieces as
``<0xE4><0xB8><0xAD>`` instead of "中"; transformers 4's ``AutoTokenizer`` has none (it converts
``LlamaTokenizer`` into an inexact fast tokenizer). The class below is, in 5.x, ``SentencePieceBackend``
and, in 4.x, the slow ``LlamaTokenizer`` (SentencePiece itself in legacy mode), with two changes in
both: text between special tokens is decoded by SentencePiece, so bytes become characters; and
``save_pretrained`` writes a folder that loads the same way again. Ids are exactly SentencePiece's in
both (BOS in front, no EOS), as without this file.

Without ``trust_remote_code=True``, transformers 5 loads its stock ``SentencePieceBackend`` (the same
ids; the ``<0x..>`` decode) and transformers 4 stops and asks for it. The folder's ``tokenizer_class``
stays that stock class, for that fallback; so transformers 4 warns that the class it loads
(``CllamaTokenizer``) is not the one named there, which is expected. The name ends in "Tokenizer" because
transformers' ``save_pretrained`` recognises a tokenizer's ``auto_map`` by it (another name is saved in a
form that no version can load back).

Standalone on purpose: it imports only transformers (which imports sentencepiece for these classes) and
the standard library.
"""

import json
import os

try:
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend as _Base  # transformers 5
except ImportError:
    from transformers import LlamaTokenizer as _Base  # transformers 4: the slow class, SentencePiece itself

SPIECE_UNDERLINE = "\u2581"
STOCK_CLASS = "SentencePieceBackend"  # the folder's tokenizer_class


class CllamaTokenizer(_Base):
    """The base class above with SentencePiece's decode (see the module docstring)."""

    def convert_tokens_to_string(self, tokens):
        # Special and added tokens are not SentencePiece text (the control piece "<s>" decodes to nothing
        # there): they are kept as written, and each run of pieces between them goes through
        # SentencePiece, which turns byte pieces back into characters.
        special = set(self.all_special_tokens) | set(self.get_added_vocab())
        # SentencePiece drops the "▁" of the dummy prefix at the start of the text only; a later run
        # keeps its space. So the output with the special tokens' strings removed is SentencePiece's
        # decode of the whole sequence.
        strips_prefix = self.sp_model.decode([SPIECE_UNDERLINE]) == ""
        parts, run, texted = [], [], False

        def flush():
            nonlocal texted
            if run:
                text = self.sp_model.decode(run)
                if texted and strips_prefix and run[0].startswith(SPIECE_UNDERLINE):
                    text = " " + text
                parts.append(text)
                texted = True
                run.clear()

        for token in tokens:
            if token in special:
                flush()
                parts.append(token)
            else:
                run.append(token)
        flush()
        return "".join(parts)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers writes this class's name as tokenizer_class, and 5.x leaves out special_tokens_pattern;
        # put back what the folder had: the stock class that loads it without trust_remote_code (with another
        # name 5.x would build an inexact fast tokenizer), and LLaMA's BOS.
        files = super().save_pretrained(save_directory, *args, **kwargs)
        for path in files:
            if os.path.basename(str(path)).endswith("tokenizer_config.json"):
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
                config.update(tokenizer_class=STOCK_CLASS, special_tokens_pattern="bos")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=2, ensure_ascii=False)
                    f.write("\n")
        return files


__all__ = ["CllamaTokenizer"]
