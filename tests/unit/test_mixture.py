"""Data mixing (data.sets): the mixture's shares, its order across resumes and process counts, each set walked
epoch by epoch, refusals naming the set, the plan's shares, and per-set validation in bits per character."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cllama_dist.config import load
from cllama_dist.data.config import DataConfig, DataSetConfig
from cllama_dist.data.loader import (
    MIX_CHUNK,
    GlobalOrder,
    MixedOrder,
    TokenBlocks,
    step_positions,
)
from cllama_dist.data.preprocess import build_manifest
from cllama_dist.data.shards import MANIFEST, ShardWriter
from cllama_dist.errors import UserError
from cllama_dist.trainer import mixture
from cllama_dist.trainer.batches import open_data
from cllama_dist.trainer.config import TrainConfig
from cllama_dist.trainer.plan import Plan
from cllama_dist.trainer.validate import Validator, Validators

VOCAB = 8
FP = {"sha256": "a" * 64, "vocab_size": VOCAB, "bos_id": 1, "eos_id": 2, "unk_id": 0}


def write_set(folder: Path, rows: dict[str, np.ndarray], sizes: dict[str, np.ndarray] | None = None,
              fingerprint: dict = FP, block: int = 4) -> Path:
    """A shard set: one shard per split, with n_chars / n_bytes when ``sizes`` is given."""
    folder.mkdir(parents=True)
    splits = {}
    for split, r in rows.items():
        w = ShardWriter(folder / f"{split}-000000.arrow", block, np.dtype(np.uint16), False, sizes is not None)
        w.add(np.asarray(r, np.uint16), None, None if sizes is None else np.asarray(sizes[split], np.int64))
        splits[split] = {"shards": [w.close()]}
    settings = {"tokenizer": fingerprint, "block_size": block, "dtype": "uint16", "add_bos": True, "add_eos": False,
                "record_boundaries": False, "validation_fraction": 0.1, "seed": 0}
    m = build_manifest(settings, splits, inputs=[], skipped={}, characters=0, plan={"synthetic": True})
    (folder / MANIFEST).write_text(json.dumps(m))
    return folder


def test_shares_are_the_weights_within_sampling_error():
    weights = [0.7, 0.2, 0.1]
    m = MixedOrder([50, 40, 3], weights, ["a", "b", "c"], seed=11)
    n = 20 * MIX_CHUNK + 123
    sets, _ = m.locate(np.arange(n))
    for s, w in enumerate(weights):
        share = float(np.mean(sets == s))
        assert abs(share - w) < 4 * math.sqrt(w * (1 - w) / n), (s, share, w)  # 4 binomial standard deviations
    assert m.consumed(n) == {name: int(np.sum(sets == s)) for s, name in enumerate("abc")}
    # another seed, another mixture
    assert (MixedOrder([50, 40, 3], weights, ["a", "b", "c"], seed=12).locate(np.arange(1000))[0] != sets[:1000]).any()


def test_each_set_is_walked_epoch_by_epoch_and_re_permuted():
    m = MixedOrder([5, 3], [0.5, 0.5], ["zh", "en"], seed=3)
    idx = m.indices(np.arange(4000))
    en = idx[idx >= 5] - 5  # set 1's rows come after set 0's (MixedData)
    epochs = en[: len(en) // 3 * 3].reshape(-1, 3)
    assert all(sorted(e) == [0, 1, 2] for e in epochs.tolist())  # every epoch holds each sequence once
    assert len({tuple(e) for e in epochs.tolist()}) > 1  # and epochs are freshly permuted
    assert m.epochs(4000)["en"] == pytest.approx(len(en) / 3)
    # a set's order is keyed by its name, not by its place in the list
    swapped = MixedOrder([3, 5], [0.5, 0.5], ["en", "zh"], seed=3)
    assert (swapped.orders[0].indices(np.arange(30)) == m.orders[1].indices(np.arange(30))).all()


def test_resume_and_process_count_do_not_change_the_order():
    sizes, weights, names = [37, 11], [0.9, 0.1], ["zh", "en"]
    G, micro, steps = 8, 2, 3 * MIX_CHUNK // 8 + 5  # past a few draw chunks

    def run(world: int, start: int, stop: int, order: MixedOrder) -> list[list[int]]:
        out = []
        for step in range(start, stop):
            got = {}
            for rank in range(world):
                for pos in step_positions(step, G, micro, rank, world):
                    got.update(zip(pos.tolist(), order.indices(pos).tolist()))
            out.append([got[p] for p in sorted(got)])
        return out

    whole = run(2, 0, steps, MixedOrder(sizes, weights, names, 5))
    cut = steps - 7
    resumed = run(2, cut, steps, MixedOrder(sizes, weights, names, 5))  # a fresh process after a kill at `cut`
    assert resumed == whole[cut:]
    assert run(1, cut, steps, MixedOrder(sizes, weights, names, 5)) == whole[cut:]  # 2 -> 1 process resume
    flat = [i for step in whole for i in step]
    assert len(flat) == steps * G


def test_single_folder_keeps_its_order():
    """A run with data.path reads GlobalOrder's [seed, epoch] order exactly as before mixing existed."""
    order = GlobalOrder(10, 4)
    perm = np.arange(10, dtype=np.int32)
    np.random.default_rng([4, 0]).shuffle(perm)
    assert order.indices(np.arange(10)).tolist() == perm.tolist()


def test_data_takes_a_list_of_sets(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: m}\ndata:\n  - {name: zh, path: s/zh, weight: 0.9}\n  - {name: en, path: s/en, weight: '1e-1'}\n")
    cfg = load(TrainConfig, path)
    assert [(s.name, s.path, s.weight) for s in cfg.data.sets] == [("zh", "s/zh", 0.9), ("en", "s/en", 0.1)]
    path.write_text("model: {path: m}\ndata: {path: s/zh}\n")  # one folder
    assert load(TrainConfig, path).data.mixture() == [DataSetConfig(name="data", path="s/zh", weight=1.0)]
    path.write_text("model: {path: m}\ndata: s/zh\n")  # the flat key of earlier versions: its new name is said
    with pytest.raises(UserError, match=r"run.yaml: data: is a section; .* use data\.path"):
        load(TrainConfig, path)
    flags = load(TrainConfig, None, {"model.path": "m", "data.sets": ["zh=s/zh:0.9", "en=s/en"]})
    assert [(s.name, s.weight) for s in flags.data.sets] == [("zh", 0.9), ("en", 1.0)]
    for bad, says in [("[{name: zh, path: a, weight: 0}]", "data.sets[0].weight: set 'zh': must be positive"),
                      ("[{name: zh, path: a}, {name: zh, path: b}]", "repeated: zh"),
                      ("[{name: zh, path: a}, {name: en, path: a}]", "two sets read the same folder a"),
                      ("[{name: 'z h', path: a}]", "may hold only letters"),
                      ("{path: x, sets: [{name: a, path: y}]}", "either path")]:
        path.write_text(f"model: {{path: m}}\ndata: {bad}\n")
        with pytest.raises(UserError, match=f"run.yaml: .*{re.escape(says)}"):
            load(TrainConfig, path)


def _rows(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(n * 4).reshape(n, 4) + start) % VOCAB


def test_a_set_of_another_tokenizer_is_refused_by_name(tmp_path):
    zh = write_set(tmp_path / "zh", {"train": _rows(6), "validation": _rows(2)})
    en = write_set(tmp_path / "en", {"train": _rows(6), "validation": _rows(2)}, fingerprint={**FP, "sha256": "b" * 64})
    data = DataConfig(sets=[DataSetConfig(name="zh", path=str(zh), weight=0.9),
                            DataSetConfig(name="en", path=str(en), weight=0.1)])
    with pytest.raises(UserError, match=r"set 'en' \(.*en\) do not match this run: tokenizer sha256"):
        mixture.read_sets(data, FP)
    other_block = write_set(tmp_path / "en8", {"train": _rows(3).repeat(2, axis=1)}, block=8)
    data = DataConfig(sets=[data.sets[0], DataSetConfig(name="en", path=str(other_block))])
    with pytest.raises(UserError, match=r"set 'en' .*block size: shards 8, config 4"):
        mixture.read_sets(data, FP)
    with pytest.raises(UserError, match="set 'nope': .* has no manifest.json"):
        mixture.read_sets(DataConfig(sets=[DataSetConfig(name="nope", path=str(tmp_path / "x"))]), FP)


def test_mixture_reads_each_set_and_the_plan_shows_shares(tmp_path):
    zh = write_set(tmp_path / "zh", {"train": _rows(30), "validation": _rows(2)})
    en = write_set(tmp_path / "en", {"train": _rows(5, start=100), "validation": _rows(2)})
    data = DataConfig(sets=[DataSetConfig(name="zh", path=str(zh), weight=3), DataSetConfig(name="en", path=str(en))],
                      micro_batch_size=2, global_batch_size=4)
    sets, block = mixture.read_sets(data, FP)
    blocks, order = mixture.train_data(sets, seed=0, single=False)
    assert isinstance(blocks, mixture.MixedData) and len(blocks) == 35 and block == 4
    pos = np.arange(64)
    rows = blocks.rows(order.indices(pos))["input_ids"]
    assert blocks.loss_tokens(order.indices(pos)) == 64 * 3
    sets_of, ks = order.locate(pos)
    zh_rows, en_rows = TokenBlocks(zh, sets[0].manifest, "train"), TokenBlocks(en, sets[1].manifest, "train")
    for r, s, k in zip(rows, sets_of, ks):
        part, o = (zh_rows, order.orders[0]) if s == 0 else (en_rows, order.orders[1])
        assert r.tolist() == part.take(o.indices(np.array([k])))[0].tolist()
    plan = Plan.make(data, 100, 1, block, len(blocks), order)
    drawn = order.consumed(400)
    assert plan.sets == (("zh", 30, drawn["zh"]), ("en", 5, drawn["en"]))
    text = plan.describe()
    assert f"zh {100 * drawn['zh'] / 400:.1f}% ({drawn['zh'] * 4:,} tokens, {drawn['zh'] / 30:.2f} epochs" in text
    assert "en " in text and "mixture:" in text
    assert mixture.identity(sets, order, False) == [{"name": "zh", "weight": 3.0, "sequences": 30},
                                                    {"name": "en", "weight": 1.0, "sequences": 5}]


class Shifted(torch.nn.Module):
    """Logits 2.0 on (input + 1) mod V, 0 elsewhere: P(next = input + 1) = e^2 / (e^2 + V - 1)."""

    def forward(self, input_ids, **_):
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits.scatter_(-1, ((input_ids + 1) % VOCAB)[..., None], 2.0)
        return type("Out", (), {"logits": logits})()


def to_inputs(rows: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in rows.items()}


def test_bits_per_character_per_set_by_hand(tmp_path):
    # zh: one row 0 1 2 3 (every next token predicted: p), 6 characters / 12 bytes; another 5 5 5 5 (never: q),
    # 4 characters / 8 bytes. en: the row 3 4 5 6 only, 9 characters, 9 bytes. Old shards: no sizes.
    zh = write_set(tmp_path / "zh", {"train": _rows(2), "validation": [[0, 1, 2, 3], [5, 5, 5, 5]]},
                   {"train": [[1, 1], [1, 1]], "validation": [[6, 12], [4, 8]]})
    en = write_set(tmp_path / "en", {"train": _rows(2), "validation": [[3, 4, 5, 6]]},
                   {"train": [[1, 1], [1, 1]], "validation": [[9, 9]]})
    old = write_set(tmp_path / "old", {"train": _rows(2), "validation": [[3, 4, 5, 6]]})
    p = math.exp(2) / (math.exp(2) + VOCAB - 1)
    q = 1 / (math.exp(2) + VOCAB - 1)
    data = DataConfig(sets=[DataSetConfig(name="zh", path=str(zh)), DataSetConfig(name="en", path=str(en)),
                            DataSetConfig(name="old", path=str(old))])
    sets, _ = mixture.read_sets(data, FP)
    v = Validators(sets, micro=1, sequences=0, single=False)
    r = v.run(Shifted(), to_inputs)
    zh_bits = -(3 * math.log2(p) + 3 * math.log2(q))
    assert r["zh/bits_per_char"] == pytest.approx(zh_bits / 10, rel=1e-6)
    assert r["zh/bits_per_byte"] == pytest.approx(zh_bits / 20, rel=1e-6)
    assert r["zh/loss"] == pytest.approx(zh_bits * math.log(2) / 6, rel=1e-6)
    assert r["en/bits_per_char"] == pytest.approx(-3 * math.log2(p) / 9, rel=1e-6)
    assert r["en/perplexity"] == pytest.approx(1 / p, rel=1e-6)
    assert "old/loss" in r and "old/bits_per_char" not in r  # format /1: no sizes, said so
    assert any("set 'old'" in n and "bits per character left out" in n for n in v.notes)
    # the pooled loss weighs each set by its evaluated sequences
    assert r["loss"] == pytest.approx((2 * r["zh/loss"] + r["en/loss"] + r["old/loss"]) / 4)
    line = v.line(10, r)
    assert line.startswith("step 10: validation zh: loss") and "bits/char" in line and "old: loss" in line
    # the first N sequences: N's own characters
    first = Validator(open_data(str(zh), sets[0].manifest, "validation"), 1, 1,
                      (np.array([6, 4]), np.array([12, 8]))).run(Shifted(), to_inputs)
    assert first["bits_per_char"] == pytest.approx(-3 * math.log2(p) / 6, rel=1e-6)


def test_mixed_data_assembles_every_column_of_its_parts():
    """MixedData over two parts of instruction-tuning rows (input_ids, labels, position_ids): each row comes from its
    part, in the order asked, and the step's loss-token count is the parts' sum."""
    class Part:
        kind, block, token_loss = "sft", 3, True

        def __init__(self, n, base):
            self.n, self.base = n, base

        def __len__(self):
            return self.n

        def rows(self, idx):
            ids = (self.base + np.asarray(idx))[:, None] + np.zeros((1, 3), np.int64)
            return {"input_ids": ids, "labels": -ids, "position_ids": np.tile(np.arange(3), (len(idx), 1))}

        def loss_tokens(self, idx):
            return 2 * len(idx)

    data = mixture.MixedData([Part(4, 100), Part(2, 200)])
    got = data.rows(np.array([5, 0, 3, 4]))
    assert got["input_ids"][:, 0].tolist() == [201, 100, 103, 200] and (got["labels"] == -got["input_ids"]).all()
    assert got["position_ids"].tolist() == [[0, 1, 2]] * 4
    assert data.loss_tokens(np.array([5, 0, 3])) == 6 and len(data) == 6 and data.kind == "sft"


def test_a_mixture_of_two_kinds_of_rows_is_refused_by_name(tmp_path):
    from cllama_dist.data.shards import SFT_FORMAT

    zh = write_set(tmp_path / "zh", {"train": _rows(6), "validation": _rows(2)})
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / MANIFEST).write_text(json.dumps({"format": SFT_FORMAT, "tokenizer": FP, "block_size": 4, "layout": "packed"}))
    data = DataConfig(sets=[DataSetConfig(name="zh", path=str(zh)), DataSetConfig(name="chat", path=str(sft))])
    with pytest.raises(UserError, match=r"set 'chat' .* holds instruction-tuning rows \(packed\), set 'zh' holds "
                                        "pre-training blocks"):
        mixture.read_sets(data, FP)
