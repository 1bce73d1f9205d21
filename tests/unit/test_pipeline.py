"""The preprocessing seam: a kind with an encoder of its own runs through the shared machinery (data/pipeline)
untouched, with the machinery's guarantees: the same bytes for any workers or tasks, resume, verified shards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cllama_dist.data import pipeline
from cllama_dist.data.config import PreprocessConfig
from cllama_dist.data.preprocess import Pretraining
from cllama_dist.data.shards import load_manifest, shard_tokens, verify_shards

from ..conftest import write_jsonl

BYTE0 = 3  # ids 0-2: unk, bos, eos; byte b is id BYTE0 + b


class ByteEncoder:
    """A byte-level tokenizer (one id per UTF-8 byte): what a second backend looks like to a kind."""

    def __init__(self, path: str):
        self.path = path

    def fingerprint(self) -> dict:
        return {"sha256": hashlib.sha256(b"bytes").hexdigest(), "vocab_size": BYTE0 + 256, "unk_id": 0, "bos_id": 1,
                "eos_id": 2, "pad_id": -1}

    def load(self) -> None:
        pass  # nothing to load: a real backend reads its model here, once per worker

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[BYTE0 + b for b in t.encode("utf-8")] for t in texts]

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2


@pytest.fixture()
def corpus(tmp_path) -> Path:
    docs = [{"text": f"第{k}篇：" + "汉字与 ASCII text " * (k % 7 + 1)} for k in range(300)]
    return write_jsonl(tmp_path / "c.jsonl", docs)


def cfg(corpus: Path, out: Path, **kw) -> PreprocessConfig:
    tok = corpus.parent / "bytes.tok"
    tok.write_text("a byte-level tokenizer\n")
    base = dict(inputs=[str(corpus)], tokenizer=str(tok), output=str(out), block_size=32, chunk_mb=0.004,
                shard_size_mb=0.004, validation_fraction=0.0, add_eos=True, workers=1)
    base.update(kw)
    return PreprocessConfig(**base)


def digest(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.arrow"))}


def test_a_second_encoder_plugs_into_the_pretraining_kind(corpus, tmp_path):
    kind = Pretraining(ByteEncoder)
    m = pipeline.preprocess(kind, cfg(corpus, tmp_path / "one"))
    assert m["tokenizer"]["vocab_size"] == BYTE0 + 256 and m["plan"]["groups"] > 2
    verify_shards(tmp_path / "one", load_manifest(tmp_path / "one"))
    # The shards hold the documents' bytes, BOS and EOS around each, packed across documents: each group's
    # shard then its remainder, in group order, give back the whole stream.
    stream = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        stream += [1] + [BYTE0 + b for b in json.loads(line)["text"].encode("utf-8")] + [2]
    got: list[int] = []
    for g in range(m["plan"]["groups"]):
        r = json.loads((tmp_path / "one" / pipeline.GROUPS / f"group-{g:06d}.json").read_text())
        if r["shards"]["train"]:
            got += shard_tokens(tmp_path / "one" / r["shards"]["train"]["file"]).reshape(-1).tolist()
        got += r["remainder"]["train"]["tokens"]
    assert got == stream

    # Two workers, and three array tasks then finalize: the same bytes.
    pipeline.preprocess(kind, cfg(corpus, tmp_path / "two", workers=2))
    for t in range(3):
        pipeline.run_task(kind, cfg(corpus, tmp_path / "three", num_tasks=3, task_id=t))
    pipeline.finalize(kind, str(tmp_path / "three"))
    assert digest(tmp_path / "one") == digest(tmp_path / "two") == digest(tmp_path / "three")

    # A resume over the same plan redoes nothing.
    again = pipeline.run_task(kind, cfg(corpus, tmp_path / "one"))
    assert again["ran"] == [] and again["tokens"] == 0
