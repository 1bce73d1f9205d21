"""Packing without crossing documents (data.document_mask): shards made by the real preprocessor with
--record-boundaries, read by trainer/batches.PretrainData, fed to a tiny LLaMA through the trainer's own
model_inputs. Changing one document leaves the logits of the next document of the same block unchanged (and
equal to that document run alone); with the option off they change, so the test can fail. Shards made without
the boundaries are refused, naming the folder or the set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cllama_dist.assets import corpus_path
from cllama_dist.data.config import DataConfig, DataSetConfig, PreprocessConfig
from cllama_dist.data.loader import BoundaryBlocks
from cllama_dist.data.preprocess import preprocess
from cllama_dist.data.shards import load_manifest
from cllama_dist.errors import UserError
from cllama_dist.model.scoring import masked_nll
from cllama_dist.trainer import mixture
from cllama_dist.trainer.batches import IGNORE, PretrainData, model_inputs
from cllama_dist.trainer.validate import Validators


def forward_inputs(rows, impl):
    inputs = model_inputs(rows, "cpu", impl, torch.float32)
    if "labels" in rows:  # document-masked blocks: the labels are copied with the inputs
        assert torch.equal(inputs.pop("labels"), torch.from_numpy(rows["labels"]))
    assert "labels" not in inputs
    return inputs


BLOCK = 96


def sentences() -> list[str]:
    """Short documents: the shipped corpus cut at every full stop (several to a block of 96 tokens)."""
    out = []
    for line in corpus_path().read_text(encoding="utf-8").splitlines():
        out += [s + "。" for s in json.loads(line)["text"].replace("\n", "").split("。") if len(s) >= 8]
    return out[:120]


def write(folder: Path, docs: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return src


def shards(root: Path, name: str, docs: list[str], tokenizer: Path, boundaries: bool = True,
           validation: float = 0.0) -> Path:
    out = root / name
    preprocess(PreprocessConfig(inputs=[str(write(root / f"{name}-src", docs))], tokenizer=str(tokenizer),
                                output=str(out), block_size=BLOCK, validation_fraction=validation, workers=1,
                                record_boundaries=boundaries))
    return out


@pytest.fixture(scope="module")
def edited(tiny_merged, tmp_path_factory):
    """Two shard sets of the same documents but one, replaced by a text of the same token count: (folder a,
    folder b, row, span of the edited document, span of the next one)."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("docmask")
    docs = sentences()
    a = shards(root, "a", docs, tiny_merged)
    data = PretrainData(str(a), load_manifest(a), "train", document_mask=True)
    starts = data.blocks.doc_starts(np.arange(len(data)))
    # the first row with two whole documents after its first start: edit the first, watch the second
    row = next(r for r, s in enumerate(starts) if len(s) >= 3)
    s = starts[row]
    doc = sum(len(x) for x in starts[:row])  # every document opens with one start; none is skipped or held out
    sp = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    want = len(sp.encode(docs[doc]))
    # one character replaced so that the document keeps its number of pieces (the block's layout stays)
    text = docs[doc]
    cands = (text[:i] + c + text[i + 1:] for i in range(len(text) - 1) for c in "的是了人在有他这大来上个到说")
    cand = next((t for t in cands if t != text and len(sp.encode(t)) == want), None)
    assert cand is not None, "no same-length replacement found"
    b = shards(root, "b", docs[:doc] + [cand] + docs[doc + 1:], tiny_merged)
    return a, b, row, (int(s[0]), int(s[1])), (int(s[1]), int(s[2]))


def tiny_llama(vocab: int, impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=BLOCK)
    cfg._attn_implementation = impl
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_changed_document_leaves_the_next_documents_logits_unchanged(edited, impl):
    a, b, row, (e0, e1), (n0, n1) = edited
    man = load_manifest(a)
    model = tiny_llama(man["tokenizer"]["vocab_size"], impl)
    rows = {}
    for mask in (True, False):
        ra, rb = (PretrainData(str(f), load_manifest(f), "train", document_mask=mask).rows(np.array([row]))
                  for f in (a, b))
        # the edit is what we think it is: the same layout, only the edited document's tokens differ
        differ = np.flatnonzero(ra["input_ids"][0] != rb["input_ids"][0])
        assert len(differ) and differ.min() >= e0 and differ.max() < e1
        with torch.no_grad():
            rows[mask] = [model(**forward_inputs(r, impl)).logits[0] for r in (ra, rb)]
        if mask:
            seg = ra["segments"][0]
            assert seg[n0] == seg[n1 - 1] != seg[n0 - 1] and ra["position_ids"][0, n0:n1].tolist() == list(range(n1 - n0))
            ids = torch.from_numpy(ra["input_ids"][0, n0:n1])[None]
            with torch.no_grad():
                alone = model(input_ids=ids).logits[0]
    la, lb = rows[True]
    assert torch.equal(la[n0:n1], lb[n0:n1])  # bit-identical: the next document never saw the edited one
    assert not torch.equal(la[e0:e1], lb[e0:e1])  # (the edited document's own logits did change)
    assert torch.allclose(la[n0:n1], alone, atol=1e-5, rtol=0)  # and it is what the document gives alone
    off_a, off_b = rows[False]
    assert (off_a[n0:n1] - off_b[n0:n1]).abs().max() > 1e-4  # without the option, attention crossed the boundary


def test_labels_and_loss_tokens_leave_document_starts_out(edited):
    a = edited[0]
    data = PretrainData(str(a), load_manifest(a), "train", document_mask=True)
    idx = np.arange(len(data))
    r = data.rows(idx)
    starts = data.blocks.doc_starts(idx)
    for k, s in enumerate(starts):
        ignored = np.flatnonzero(r["labels"][k, 1:] == IGNORE) + 1
        assert ignored.tolist() == [int(x) for x in s if x > 0]
        assert np.array_equal(np.delete(r["labels"][k], ignored), np.delete(r["input_ids"][k], ignored))
    assert data.loss_tokens(idx) == int((r["labels"][:, 1:] != IGNORE).sum())
    assert data.loss_tokens(idx) < len(idx) * (BLOCK - 1)
    plain = PretrainData(str(a), load_manifest(a), "train")
    assert plain.loss_tokens(idx) == len(idx) * (BLOCK - 1) and set(plain.rows(idx)) == {"input_ids"}
    assert np.array_equal(plain.rows(idx)["input_ids"], r["input_ids"])
    # the doc_starts read in place are the column the preprocessor wrote
    import pyarrow as pa

    col = []
    for s in load_manifest(a)["splits"]["train"]["shards"]:
        col += pa.ipc.open_stream(pa.memory_map(str(a / s["file"]))).read_all().column("doc_starts").to_pylist()
    assert [x.tolist() for x in starts] == col


def test_validation_scores_each_document_alone(tiny_merged, tmp_path):
    """Validation with data.document_mask: the validator's loss equals a hand computation of the masked NLL."""
    folder = shards(tmp_path, "v", sentences(), tiny_merged, validation=0.3)
    data = DataConfig(path=str(folder), document_mask=True)
    fp = load_manifest(folder)["tokenizer"]
    sets, _ = mixture.read_sets(data, {k: fp[k] for k in ("sha256", "vocab_size", "bos_id", "eos_id", "unk_id")})
    v = Validators(sets, micro=2, sequences=0, single=True)
    model = tiny_llama(fp["vocab_size"], "sdpa")
    model.train = model.eval = lambda *a, **k: model  # the validator calls the engine's train() / eval()

    def to_device(rows):
        return model_inputs(rows, "cpu", "sdpa", torch.float32)

    got = v.run(model, to_device)
    part = v.parts[0][1].blocks
    r = part.rows(np.arange(len(part)))
    with torch.no_grad():
        inputs = to_device(r)
        labels = inputs.pop("labels")
        nll, count = masked_nll(model, inputs, labels)
    assert int(count.sum()) == part.loss_tokens(np.arange(len(part)))
    assert got["loss"] == pytest.approx(float(nll.double().sum()) / int(count.sum()), rel=1e-6)


def test_shards_without_boundaries_are_refused_naming_the_folder_or_set(tiny_merged, tmp_path):
    docs = sentences()[:40]
    plain = shards(tmp_path, "plain", docs, tiny_merged, boundaries=False)
    marked = shards(tmp_path, "marked", docs, tiny_merged)
    fp = {k: load_manifest(plain)["tokenizer"][k] for k in ("sha256", "vocab_size", "bos_id", "eos_id", "unk_id")}
    with pytest.raises(UserError, match=rf"data.document_mask: the shards in {plain} were made without "
                                        r"--record-boundaries"):
        mixture.read_sets(DataConfig(path=str(plain), document_mask=True), fp)
    mixed = DataConfig(sets=[DataSetConfig(name="zh", path=str(marked)), DataSetConfig(name="en", path=str(plain))],
                       document_mask=True)
    with pytest.raises(UserError, match=rf"data.document_mask: set 'en' \({plain}\) was made without"):
        mixture.read_sets(mixed, fp)
    # the option off: both read as always; on with boundaries everywhere: a mixture keeps documents apart
    mixture.read_sets(DataConfig(path=str(plain)), fp)
    both = DataConfig(sets=[DataSetConfig(name="zh", path=str(marked)),
                            DataSetConfig(name="zh2", path=str(shards(tmp_path, "m2", docs, tiny_merged)))],
                      document_mask=True)
    sets, _ = mixture.read_sets(both, fp)
    data, order = mixture.train_data(sets, seed=0, single=False)
    idx = order.indices(np.arange(8))
    rows = data.rows(idx)
    assert set(rows) == {"input_ids", "labels", "segments", "position_ids"} and data.token_loss
    assert data.loss_tokens(idx) == int((rows["labels"][:, 1:] != IGNORE).sum())
    # the loader alone refuses too (a reader that skips the mixture's check)
    with pytest.raises(UserError, match=f"the shards in {plain} were made without --record-boundaries"):
        BoundaryBlocks(plain, load_manifest(plain), "train")


def test_flash_attention_with_more_than_one_row_is_refused():
    """transformers' flash path reads position-id restarts only for a batch of one row: with more it would attend
    across documents silently, so the mask builder refuses it (a shape check, no host synchronisation)."""
    from cllama_dist.model.packing import document_mask

    seg = torch.tensor([[1, 1, 2, 2]])
    assert document_mask(seg, "flash_attention_2", torch.bfloat16) is None
    with pytest.raises(UserError, match="flash_attention_2 keeps packed examples or documents apart only with one row"):
        document_mask(seg.repeat(2, 1), "flash_attention_2", torch.bfloat16)
