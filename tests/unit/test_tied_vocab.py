"""Tied embeddings and padded rows (DESIGN B6, B7): one block of new rows serves embed_tokens and lm_head,
the old rows never move, optimizer state covers the new rows alone, and padding rows are reused first."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cllama_dist.model.adapters import apply_lora, count_parameters, install_loss_forward
from cllama_dist.model.config import LoraConfig
from cllama_dist.model.vocab import SplitEmbedding, SplitLMHead, extend_vocab, is_tied, split_vocab

H = 32


def tiny(rows: int, tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied))


def train(model, vocab: int, steps: int = 3, lr: float = 1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_tied_model_keeps_one_matrix_and_its_old_rows():
    m = tiny(64)
    old = m.get_input_embeddings().weight.detach().clone()
    extend_vocab(m, 64, 80, "mean")
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    assert isinstance(emb, SplitEmbedding) and isinstance(head, SplitLMHead) and is_tied(m)
    # The same Parameters (one storage), not equal copies.
    assert head.weight_new is emb.weight_new and head.weight_base is emb.weight_base
    assert head.weight_new.data_ptr() == emb.weight_new.data_ptr()
    assert m.config.tie_word_embeddings and m.config.vocab_size == 80
    m = apply_lora(m, LoraConfig(dropout=0.0), "new-rows", seed=0)
    install_loss_forward(m)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable == ["base_model.model.model.embed_tokens.weight_new"]  # once, under one name
    before = emb.weight_new.detach().clone()
    opt = train(m, 80)
    lm = m.get_base_model()
    assert is_tied(lm) and torch.equal(lm.get_output_embeddings().weight_new, lm.get_input_embeddings().weight_new)
    assert not torch.equal(emb.weight_new, before)
    assert torch.equal(emb.weight_base, old)  # bit-identical after AdamW with weight decay
    lora = sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)
    state = sum(s["exp_avg"].numel() for s in opt.state.values())
    assert state == lora + 16 * H  # the 16 new rows once, not twice; never the old rows
    assert count_parameters(m).new_rows == 16 * H
    lm.tie_weights()  # transformers' call is a check here, not an error


def test_tied_logits_use_the_one_matrix_for_input_and_output():
    m = tiny(64)
    extend_vocab(m, 64, 80, "normal", seed=1)
    emb = m.get_input_embeddings()
    ref = tiny(80)
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(emb.full_weight())
        for a, b in zip(ref.model.layers.parameters(), m.model.layers.parameters()):
            a.copy_(b)
        ref.model.norm.weight.copy_(m.model.norm.weight)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    ids = torch.randint(0, 80, (2, 10))
    assert torch.allclose(m(ids).logits, ref(ids).logits, atol=1e-6)


def test_padding_rows_are_reused_first():
    # 300 tokens in 320 rows: 30 new tokens take rows 300..329; the 20 padding rows are the first of them.
    m = tiny(320, tied=False)
    e0 = m.get_input_embeddings().weight.detach().clone()
    h0 = m.get_output_embeddings().weight.detach().clone()
    spell = [[i % 300, (7 * i) % 300] for i in range(30)]
    extend_vocab(m, 300, 330, "subword", subword_ids=spell, rows=320)
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    assert m.config.vocab_size == 330 and emb.orig_vocab == 300 and emb.new_vocab == 330
    assert emb.weight_base.shape[0] == 300 and emb.weight_new.shape[0] == 30
    assert torch.equal(emb.weight_base, e0[:300]) and torch.equal(head.weight_base, h0[:300])
    # Row 300 (a padding row before) now spells token 300 from the base rows, each matrix from its own.
    assert torch.allclose(emb.weight_new[0], e0[[0, 0]].mean(0))
    assert torch.allclose(head.weight_new[5], h0[[5, 35]].mean(0))
    assert m(torch.tensor([[1, 305, 329]])).logits.shape[-1] == 330


def test_padding_rows_beyond_every_token_keep_their_values():
    m = tiny(320)
    w0 = m.get_input_embeddings().weight.detach().clone()
    extend_vocab(m, 300, 310, "mean", rows=320)  # 10 new tokens in the 20 padding rows
    emb = m.get_input_embeddings()
    assert m.config.vocab_size == 320 and emb.weight_new.shape[0] == 20 and is_tied(m)
    assert torch.equal(emb.weight_new[10:], w0[310:320])
    assert torch.allclose(emb.weight_new[0], w0[:300].mean(0))
    m = apply_lora(m, LoraConfig(dropout=0.0), "new-rows", seed=0)
    install_loss_forward(m)
    train(m, 310)
    assert torch.equal(m.get_base_model().get_input_embeddings().weight_base, w0[:300])


def test_split_vocab_keeps_a_merged_tied_model_tied():
    m = tiny(80)
    w0 = m.get_input_embeddings().weight.detach().clone()
    split_vocab(m, 64, 80)
    emb = m.get_input_embeddings()
    assert is_tied(m) and torch.equal(emb.full_weight(), w0)


def test_refuses_fewer_rows_than_tokens():
    with pytest.raises(ValueError, match="fewer than its tokenizer"):
        extend_vocab(tiny(64), 70, 80, rows=64)


def test_resume_of_a_tied_run_on_an_untied_model_is_refused_in_one_line(tmp_path):
    from cllama_dist.errors import UserError
    from cllama_dist.trainer.state import RunIdentity

    def identity(tied: bool) -> RunIdentity:
        return RunIdentity(global_batch=8, tokenizer={"sha256": "ab"}, embeddings="new-rows", block_size=64,
                           zero_stage=3, base_model={"sha256": "x" if tied else "y"}, mixture=[], document_mask=False,
                           shards=[], schedule={}, tied=tied)

    state = {"tokenizer_sha256": "ab", **identity(True).record()}
    identity(True).check(tmp_path, state)
    with pytest.raises(UserError) as exc:
        identity(False).check(tmp_path, state)
    text = str(exc.value)
    assert "\n" not in text and "tied embeddings" in text and "untied embeddings" in text and str(tmp_path) in text


def test_a_merged_padded_model_is_recognised_by_its_export_record(tmp_path):
    import json

    from cllama_dist.model.adapters import is_extended
    from cllama_dist.model.config import ModelConfig

    cfg = ModelConfig(path=str(tmp_path))
    assert is_extended(cfg, 80, 64, 80)  # rows == the merged tokenizer's length: as always
    assert not is_extended(cfg, 320, 300, 310)  # a padded base, not merged: the padding rows are reused
    (tmp_path / "cllama_export.json").write_text(json.dumps({"kind": "merged", "new_vocab": 310, "rows": 320}))
    assert is_extended(cfg, 320, 300, 310)  # the same sizes, merged by `cllama export merged`: its rows train on
