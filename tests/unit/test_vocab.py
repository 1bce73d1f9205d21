import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cllama_dist.model.vocab import SplitEmbedding, extend_vocab, new_row_values, subword_ids_for

V, V2, H = 64, 80, 32


def tiny_llama(vocab=V, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def test_forward_equals_a_resized_model():
    m = tiny_llama()
    ref = tiny_llama()
    ref.resize_token_embeddings(V2, mean_resizing=False)
    extend_vocab(m, V, V2, method="normal", seed=3)
    # Copy the split's rows into the plain resized model: both must then compute the same logits.
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(m.get_input_embeddings().full_weight())
        ref.get_output_embeddings().weight.copy_(m.get_output_embeddings().full_weight())
    ids = torch.randint(0, V2, (2, 12))
    assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-6)
    assert m.config.vocab_size == V2 and m(ids).logits.shape[-1] == V2


def test_old_rows_cannot_move_under_adamw_with_weight_decay():
    m = tiny_llama()
    extend_vocab(m, V, V2)
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    old_e, old_h = emb.weight_base.clone(), head.weight_base.clone()
    new_e = emb.weight_new.clone()
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} >= {id(emb.weight_new), id(head.weight_new)}
    assert not emb.weight_base.requires_grad and not head.weight_base.requires_grad
    opt = torch.optim.AdamW([emb.weight_new, head.weight_new], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        ids = torch.randint(0, V2, (2, 16))
        m(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(emb.weight_base, old_e) and torch.equal(head.weight_base, old_h)
    assert not torch.equal(emb.weight_new, new_e)
    state = sum(s["exp_avg"].numel() for s in opt.state.values())
    assert state == 2 * (V2 - V) * H  # optimizer state covers the new rows only


def test_init_methods():
    base = torch.randn(V, H)
    assert torch.allclose(new_row_values(base, 3, "mean")[1], base.mean(0))
    sub = new_row_values(base, 2, "subword", subword_ids=[[1, 2], []])
    assert torch.allclose(sub[0], base[[1, 2]].mean(0)) and torch.allclose(sub[1], base.mean(0))
    g = torch.Generator().manual_seed(0)
    assert new_row_values(base, 1000, "normal", std=0.5, generator=g).std().item() == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError):
        new_row_values(base, 2, "subword", subword_ids=[[1]])


def test_subword_ids_spell_new_pieces_with_the_base(tiny_base, tiny_merged):
    import sentencepiece as spm

    base = spm.SentencePieceProcessor(model_file=str(tiny_base / "tokenizer.model"))
    merged = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    pieces = [merged.id_to_piece(i) for i in range(base.get_piece_size(), merged.get_piece_size())]
    ids = subword_ids_for(pieces, base)
    for piece, spelled in zip(pieces[:200], ids[:200]):
        assert base.decode(spelled) == piece.replace("▁", " ").lstrip(" ") or piece.startswith("▁")
        assert all(i < base.get_piece_size() for i in spelled)


def test_refuses_shrinking():
    # Tied models are extended now (tests/unit/test_tied_vocab.py); shrinking is still refused.
    m = tiny_llama()
    with pytest.raises(ValueError, match="smaller"):
        extend_vocab(m, V, V - 1)


def test_split_embedding_padding_and_boundaries():
    e = SplitEmbedding(torch.arange(8.0).reshape(4, 2), torch.full((2, 2), -1.0))
    out = e(torch.tensor([[0, 3, 4, 5]]))
    assert out.tolist() == [[[0, 1], [6, 7], [-1, -1], [-1, -1]]]
