"""Packed examples do not see each other: changing one example of a packed row leaves the logits of its
neighbours unchanged, and each equals the example run alone (sdpa and eager), through the trainer's own path
(shards -> trainer/batches.SFTData -> model_inputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cllama_dist.model.packing import document_mask, positions_from_segments
from cllama_dist.trainer.batches import SFTData, model_inputs


def test_positions_restart_at_every_segment():
    seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


def test_document_mask_is_block_diagonal_and_causal():
    seg = torch.tensor([[1, 1, 2, 2, 0]])
    m = document_mask(seg, "sdpa", torch.float32)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    e = document_mask(seg, "eager", torch.float32)[0, 0]
    assert torch.equal(e == 0, torch.tensor(m, dtype=torch.bool))
    assert document_mask(seg, "flash_attention_2", torch.float32) is None
    with pytest.raises(ValueError, match="no document mask"):
        document_mask(seg, "mystery", torch.float32)


def tiny_llama(vocab: int, impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    cfg._attn_implementation = impl
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def two_packings(tiny_merged, tmp_path_factory):
    """The same records packed twice, the second time with one record's response changed."""
    from cllama_dist.data.config import SFTPreprocessConfig
    from cllama_dist.data.sft import preprocess_sft

    root = tmp_path_factory.mktemp("packing")
    records = [{"instruction": f"把第{i}句话重复一遍：今天天气很好。", "input": "", "output": "今天天气很好。" * (1 + i % 3)}
               for i in range(12)]
    out = []
    for name, edit in (("a", None), ("b", "完全不同的一个回答，长一些，好让它占更多位置。")):
        recs = [dict(r) for r in records]
        if edit:
            recs[0]["output"] = edit
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
        folder = root / name
        preprocess_sft(SFTPreprocessConfig(inputs=[str(src)], tokenizer=str(tiny_merged), output=str(folder),
                                           max_length=256, layout="packed", validation_fraction=0.0, workers=1))
        out.append(folder)
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_changed_example_leaves_its_packed_neighbours_logits_unchanged(two_packings, impl):
    from cllama_dist.data.shards import load_sft_manifest

    datas = [SFTData(str(f), load_sft_manifest(f), "train") for f in two_packings]
    vocab = load_sft_manifest(two_packings[0])["tokenizer"]["vocab_size"]
    model = tiny_llama(vocab, impl)
    compared = 0
    for row in range(len(datas[0])):
        a, b = (d.rows(np.array([row])) for d in datas)
        seg_a, seg_b = a["segments"][0], b["segments"][0]
        with torch.no_grad():
            la, lb = (model(**{k: v for k, v in model_inputs(r, "cpu", impl, torch.float32).items() if k != "labels"})
                      .logits[0] for r in (a, b))
        for s in range(1, int(seg_a.max()) + 1):
            ta, tb = np.flatnonzero(seg_a == s), np.flatnonzero(seg_b == s)
            same = len(ta) == len(tb) and np.array_equal(a["input_ids"][0, ta], b["input_ids"][0, tb])
            if not same:
                continue  # the edited example itself
            # Unchanged example: the same logits wherever the packing put it, and the same as alone.
            assert torch.allclose(la[ta], lb[tb], atol=1e-5)
            with torch.no_grad():
                alone = model(input_ids=torch.from_numpy(a["input_ids"][0, ta])[None]).logits[0]
            assert torch.allclose(la[ta], alone, atol=1e-5)
            compared += 1
    assert compared >= 4  # examples that shared a row with another one were compared
    # The edit did change something the test could see: the packing of the first row differs.
    assert not np.array_equal(datas[0].rows(np.array([0]))["input_ids"], datas[1].rows(np.array([0]))["input_ids"])


def test_loss_tokens_are_the_scored_response_positions(two_packings):
    """The count the trainer divides by (every rank, without a collective) equals the labels' non-ignored
    positions after the shift, over any set of rows."""
    from cllama_dist.data.shards import load_sft_manifest

    d = SFTData(str(two_packings[0]), load_sft_manifest(two_packings[0]), "train")
    idx = np.array([len(d) - 1, 0, 0])  # out of order, repeated: as a global order hands them out
    labels = d.rows(idx)["labels"]
    assert d.loss_tokens(idx) == int((labels[:, 1:] != -100).sum()) > 0
    assert d.loss_tokens(np.array([], dtype=np.int64)) == 0
