"""A mixture of two shard sets (Chinese and English, data.sets) trained by 2 processes: shares and epochs per set
logged, bits per character per set at every evaluation, and the run resumed from a mid-run checkpoint on 2
processes (bit for bit) and on 1 process (the 2 -> 1 universal path) following the uninterrupted curve."""

from __future__ import annotations

import json
import shutil

import pytest

from . import launch
from .runs import STEPS, base_config


@pytest.fixture(scope="module")
def en_shards(tmp_path_factory, tiny_merged):
    from cllama_dist.data.config import PreprocessConfig
    from cllama_dist.data.preprocess import preprocess
    from cllama_dist.tokenizer.base import stdlib_docstrings

    d = tmp_path_factory.mktemp("en")
    text = d / "en.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_docstrings(max_chars=60_000)))
    preprocess(PreprocessConfig(inputs=[str(text)], tokenizer=str(tiny_merged), output=str(d / "shards"),
                                block_size=64, validation_fraction=0.1, workers=1))
    return d / "shards"


@pytest.fixture(scope="module")
def mixed(setup, en_shards):
    model, tok, zh, root = setup

    def configure(name: str):
        cfg = base_config(model, tok, zh, root / name)
        cfg["data"] = {"sets": [{"name": "zh", "path": str(zh), "weight": 0.75},
                                {"name": "en", "path": str(en_shards), "weight": 0.25}],
                       "micro_batch_size": 2, "global_batch_size": 8}
        return launch.write_config(root / f"{name}.yaml", **cfg), root / name

    cfg, out = configure("mixed")
    proc = launch.run(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return configure, out, launch.losses(out), proc


def test_mixture_logs_shares_epochs_and_bits_per_character_per_set(mixed):
    _, out, losses, proc = mixed
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert "; mixture: zh " in proc.stdout and ", en " in proc.stdout and "% (" in proc.stdout
    evals = launch.metrics(out, "eval")
    assert [e["step"] for e in evals] == [5, 10]
    for e in evals:
        for name in ("zh", "en"):
            assert 0 < e[f"{name}/bits_per_char"] and 0 < e[f"{name}/bits_per_byte"] <= e[f"{name}/bits_per_char"]
            assert e[f"{name}/perplexity"] > 1
    assert "bits/char" in proc.stdout and "validation zh: loss" in proc.stdout
    last = launch.metrics(out, "train")[-1]
    assert last["epochs/zh"] > 0 and last["epochs/en"] > 0
    state = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert [s["name"] for s in state["mixture"]] == ["zh", "en"]


@pytest.mark.parametrize("nproc", [2, 1])
def test_mixture_resumes_exactly_on_two_and_on_one_process(mixed, nproc):
    configure, out, losses, _ = mixed
    cfg, again = configure(f"mixed-resume-{nproc}")
    shutil.copytree(out / "checkpoints" / "step-00000004", again / "checkpoints" / "step-00000004")
    proc = launch.run(cfg, nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    got = launch.losses(again)
    assert sorted(got) == list(range(5, STEPS + 1))
    for step in got:
        if nproc == 2:
            assert got[step] == losses[step], step  # the same batches, bit for bit
        else:
            assert got[step] == pytest.approx(losses[step], abs=1e-5), step


@pytest.fixture(scope="module")
def bounded_sets(tmp_path_factory, tiny_merged, en_shards):
    """The same two sets preprocessed again with --record-boundaries (the same input_ids, plus doc_starts)."""
    from cllama_dist.assets import corpus_path
    from cllama_dist.data.config import PreprocessConfig
    from cllama_dist.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("bounded")
    for name, src, frac in (("zh", corpus_path(), 0.1), ("en", en_shards.parent / "en.jsonl", 0.1)):
        preprocess(PreprocessConfig(inputs=[str(src)], tokenizer=str(tiny_merged), output=str(d / name),
                                    block_size=64, validation_fraction=frac, workers=1, record_boundaries=True))
    return d / "zh", d / "en"


@pytest.mark.parametrize("nproc", [2, 1])
def test_document_mask_trains_the_mixture_alike_on_two_and_one_process(mixed, setup, bounded_sets, nproc):
    """data.document_mask on a mixture: the loss is normalised by the global batch's loss tokens, so 2 and 1
    processes follow one curve; it differs from the same batches without the option from step 1 on."""
    model, tok, zh, root = setup
    cfg = base_config(model, tok, zh, root / f"docmask-{nproc}", **{"optim.max_steps": 4, "validation.every": 2})
    cfg["data"] = {"sets": [{"name": "zh", "path": str(bounded_sets[0]), "weight": 0.75},
                            {"name": "en", "path": str(bounded_sets[1]), "weight": 0.25}],
                   "micro_batch_size": 2, "global_batch_size": 8, "document_mask": True}
    out = root / f"docmask-{nproc}"
    proc = launch.run(launch.write_config(root / f"docmask-{nproc}.yaml", **cfg), nproc=nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "documents kept apart (data.document_mask)" in proc.stdout
    got = launch.losses(out)
    assert sorted(got) == [1, 2, 3, 4]
    assert abs(got[1] - mixed[2][1]) > 1e-3  # the same rows as the mixed run, but no attention across documents
    evals = launch.metrics(out, "eval")
    assert [e["step"] for e in evals] == [2, 4] and all(e["zh/bits_per_char"] > 0 for e in evals)
    if nproc == 2:
        (root / "docmask-losses.json").write_text(json.dumps(got))
    else:
        two = {int(k): v for k, v in json.loads((root / "docmask-losses.json").read_text()).items()}
        for step in got:
            assert got[step] == pytest.approx(two[step], abs=1e-5), step
