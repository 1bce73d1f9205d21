"""New rows from their pieces on a byte-level BPE extension (DESIGN B10): the trainer reads the merged
BPE folder, and each new token is spelled by the base tokenizer's own merges (the merge report names the base)."""

import pytest

from cllama_dist.assets import corpus_path
from cllama_dist.tokenizer.config import MergeConfig, TokenizerTrainConfig
from cllama_dist.tokenizer.merge import merge
from cllama_dist.tokenizer.merged import base_available, read_merged, subword_spellings
from cllama_dist.tokenizer.train import train

from .test_bpe_tokenizer import _load, make_base


@pytest.fixture(scope="module")
def bpe_merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe_init")
    base = make_base(root / "base")
    train(TokenizerTrainConfig(inputs=[str(corpus_path())], output=str(root / "zh"), vocab_size=1500, base=str(base)))
    merge(MergeConfig(base=str(base), add=str(root / "zh.json"), out=str(root / "merged")))
    return base, root / "merged"


def test_bpe_new_tokens_are_spelled_by_the_base(bpe_merged):
    base, out = bpe_merged
    base_tok, merged_tok = _load(base), _load(out)
    rows = base_tok.get_vocab_size(with_added_tokens=True) + 20  # a padded base: more rows than tokens
    vocab = read_merged(str(out), rows)
    assert vocab.fingerprint["backend"] == "bpe" and base_available(vocab)
    assert vocab.orig_vocab == base_tok.get_vocab_size(with_added_tokens=True)  # tokens, not the model's rows
    assert vocab.new_vocab == merged_tok.get_vocab_size(with_added_tokens=True)
    spelled = subword_spellings(vocab)
    assert len(spelled) == vocab.new_vocab - vocab.orig_vocab
    spelled_any = 0
    for i, ids in zip(range(vocab.orig_vocab, vocab.new_vocab), spelled):
        assert all(j < vocab.orig_vocab for j in ids)
        token = merged_tok.id_to_token(i)
        if ids:
            spelled_any += 1
            # The base tokens' byte strings concatenate to the new token's: the same bytes, split finer.
            assert "".join(base_tok.id_to_token(j) for j in ids) == token
            assert len(ids) >= 2 or base_tok.token_to_id(token) is not None
    assert spelled_any == len(spelled)  # every appended token is made of base bytes
