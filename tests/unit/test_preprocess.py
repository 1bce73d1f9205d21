import hashlib
import os
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from cllama_dist.assets import corpus_path
from cllama_dist.data.config import PreprocessConfig
from cllama_dist.data.pipeline import GROUPS, split_of
from cllama_dist.data.preprocess import Packer, finalize, preprocess, run_task, token_sizes
from cllama_dist.data.loader import text_sizes
from cllama_dist.data.shards import FORMAT, check_manifest, load_manifest, shard_tokens, verify_shards
from cllama_dist.errors import UserError
from cllama_dist.tokenizer.spm import fingerprint

from .. import golden
from ..conftest import write_jsonl

BLOCK = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, zh_docs):
    """The shipped corpus three times over, with distinct documents (about 460 KB)."""
    d = tmp_path_factory.mktemp("corpus")
    docs = [{"text": f"{t}（第{k}版）"} for k in range(3) for t in zh_docs]
    return write_jsonl(d / "c.jsonl", docs)


def cfg(tiny_merged, corpus, out, **kw):
    base = dict(inputs=[str(corpus)], tokenizer=str(tiny_merged), output=str(out), block_size=BLOCK,
                chunk_mb=0.03, shard_size_mb=0.02, validation_fraction=0.1, workers=1)
    base.update(kw)
    return PreprocessConfig(**base)


def expected_streams(tiny_merged, corpus, fraction=0.1, seed=0, bos=True, eos=False):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    streams = {"train": [], "validation": []}
    docs = {"train": 0, "validation": 0}
    for line in Path(corpus).read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        split = ("train", "validation")[split_of(text, fraction, seed)]
        streams[split] += ([1] if bos else []) + sp.encode(text) + ([2] if eos else [])
        docs[split] += 1
    return streams, docs


def folder_digest(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.arrow"))}


def test_token_stream_equals_direct_encoding(tiny_merged, corpus, tmp_path):
    out = tmp_path / "o"
    m = preprocess(cfg(tiny_merged, corpus, out))
    streams, docs = expected_streams(tiny_merged, corpus)
    assert m["plan"]["groups"] > 3  # several shards, so remainders cross groups
    for split in ("train", "validation"):
        # Group shards plus each group's remainder, in group order, give back the whole stream.
        got = []
        for rec in sorted((out / GROUPS).glob("group-*.json")):
            r = json.loads(rec.read_text())
            if r["shards"][split]:
                got += shard_tokens(out / r["shards"][split]["file"]).reshape(-1).tolist()
            got += r["remainder"][split]["tokens"]
        assert got == streams[split]
        info = m["splits"][split]
        assert info["documents"] == docs[split]
        assert info["document_tokens"] == len(streams[split])
        assert info["tokens"] + info["dropped_tail_tokens"] == len(streams[split])
        assert info["dropped_tail_tokens"] < BLOCK
        for shard in info["shards"]:
            t = shard_tokens(out / shard["file"])
            assert t.shape == (shard["sequences"], BLOCK) and t.dtype == np.uint16
    verify_shards(out, m, checksums=True)
    assert m["tokenizer"] == fingerprint(tiny_merged)
    # The shard bytes themselves, against those recorded when format cllama-shards/2 added n_chars / n_bytes.
    golden.check("preprocess_shards", {"shards": folder_digest(out), "sequences": {
        k: m["splits"][k]["sequences"] for k in ("train", "validation")}})


def test_single_group_is_the_stream_prefix(tiny_merged, corpus, tmp_path):
    out = tmp_path / "o"
    m = preprocess(cfg(tiny_merged, corpus, out, shard_size_mb=100, add_eos=True))
    streams, _ = expected_streams(tiny_merged, corpus, eos=True)
    flat = np.concatenate([shard_tokens(out / s["file"]).reshape(-1) for s in m["splits"]["train"]["shards"]])
    assert flat.tolist() == streams["train"][: len(flat)]
    assert len(streams["train"]) - len(flat) < BLOCK


def test_packer_boundaries():
    class Sink:
        rows, starts = [], []

        def add(self, rows, starts):
            self.rows.append(rows)
            self.starts += starts

    sink = Sink()
    p = Packer(4, np.dtype(np.uint16), sink, boundaries=True)
    # Documents of lengths 3, 6, 2 -> stream 0..10, rows [0..3] [4..7], remainder [8,9,10]
    p.feed(np.arange(11, dtype=np.uint16), np.array([3, 6, 2]))
    assert np.concatenate(sink.rows).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sink.starts == [[0, 3], []]
    assert p.remainder() == {"tokens": [8, 9, 10], "starts": [1]}
    p.feed(np.arange(11, 14, dtype=np.uint16), np.array([3]))
    assert np.concatenate(sink.rows)[-1].tolist() == [8, 9, 10, 11] and sink.starts[-1] == [1, 3]


def test_split_is_deterministic_per_document():
    texts = [f"文档{i}" for i in range(20000)]
    a = [split_of(t, 0.1, 7) for t in texts]
    assert a == [split_of(t, 0.1, 7) for t in reversed(texts)][::-1]
    assert 0.08 < sum(a) / len(a) < 0.12
    assert a != [split_of(t, 0.1, 8) for t in texts]
    assert sum(split_of(t, 0.0, 7) for t in texts) == 0




def test_slurm_array_environment_defaults(monkeypatch, tiny_merged, corpus, tmp_path):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    from cllama_dist.data.pipeline import resolve_task

    # The config keeps "unset" (0 / -1); the task resolves it from Slurm's array variables when it runs, so a
    # config built on a login node and pickled into a job reads the job's own variables.
    c = resolve_task(cfg(tiny_merged, corpus, tmp_path / "o"))
    assert (c.num_tasks, c.task_id) == (4, 1)


def test_finalize_refuses_unfinished_tasks(tiny_merged, corpus, tmp_path):
    run_task(cfg(tiny_merged, corpus, tmp_path / "o", num_tasks=3, task_id=0))
    with pytest.raises(UserError, match="groups are not finished"):
        finalize(str(tmp_path / "o"))



def test_refuses_output_of_other_settings(tiny_merged, tiny_base, corpus, tmp_path):
    out = tmp_path / "o"
    preprocess(cfg(tiny_merged, corpus, out))
    with pytest.raises(UserError, match="block_size 64 there, 128 now"):
        preprocess(cfg(tiny_merged, corpus, out, block_size=128))
    with pytest.raises(UserError, match=r"tokenizer sha256 .* there, .* now"):
        preprocess(cfg(tiny_base, corpus, out))
    m = preprocess(cfg(tiny_merged, corpus, out, block_size=128, overwrite=True))
    assert m["block_size"] == 128


def test_manifest_check_names_both_sides(tiny_merged, tiny_base, corpus, tmp_path):
    m = preprocess(cfg(tiny_merged, corpus, tmp_path / "o"))
    check_manifest(m, fingerprint(tiny_merged), BLOCK)
    with pytest.raises(UserError) as exc:
        check_manifest(m, fingerprint(tiny_base), 128)
    msg = str(exc.value)
    assert f"shards {m['tokenizer']['vocab_size']:,}, tokenizer {fingerprint(tiny_base)['vocab_size']:,}" in msg
    assert "block size: shards 64, config 128" in msg


def test_bad_input_is_counted_or_fails_with_location(tiny_merged, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "\xe5\xa5\xbd\xe7\x9a\x84"}\n{"text": "\xff"}\n{"text": \n{"t": 1}\n{"text": ""}\n'
                  + json.dumps({"text": "长" * 500}).encode() + b"\n")
    m = preprocess(PreprocessConfig(inputs=[str(p)], tokenizer=str(tiny_merged), output=str(tmp_path / "o"),
                                    block_size=2, max_doc_chars=100, workers=1))
    assert m["skipped"] == {"invalid_utf8": 1, "malformed_json": 1, "missing_field": 1, "empty": 1, "too_long": 1}
    assert m["totals"]["documents"] == 1
    with pytest.raises(UserError, match=rf"{p}:2: invalid UTF-8"):
        preprocess(PreprocessConfig(inputs=[str(p)], tokenizer=str(tiny_merged), output=str(tmp_path / "s"),
                                    block_size=2, strict=True, workers=1))
    assert not (tmp_path / "s" / "manifest.json").exists()
    with pytest.raises(UserError, match="tokenizer not found"):
        preprocess(PreprocessConfig(inputs=[str(p)], tokenizer=str(tmp_path / "none"), output=str(tmp_path / "x")))
    with pytest.raises(UserError, match="not found"):
        preprocess(PreprocessConfig(inputs=[str(tmp_path / "none.jsonl")], tokenizer=str(tiny_merged),
                                    output=str(tmp_path / "x")))


def test_compressed_and_parquet_inputs(tiny_merged, tmp_path, zh_docs):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in zh_docs[:60]))
    pq.write_table(pa.table({"text": zh_docs[60:]}), tmp_path / "b.parquet", row_group_size=10)
    m = preprocess(PreprocessConfig(inputs=[str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet")],
                                    tokenizer=str(tiny_merged), output=str(tmp_path / "o"), block_size=BLOCK,
                                    chunk_mb=0.01, shard_size_mb=0.01, validation_fraction=0, workers=2))
    sp = spm.SentencePieceProcessor(model_file=str(tiny_merged / "tokenizer.model"))
    assert m["splits"]["train"]["document_tokens"] == sum(len(x) + 1 for x in sp.encode(zh_docs))
    assert m["splits"]["train"]["documents"] == len(zh_docs)


def test_readable_by_datasets_and_boundaries(tiny_merged, corpus, tmp_path):
    import datasets

    out = tmp_path / "o"
    m = preprocess(cfg(tiny_merged, corpus, out, record_boundaries=True))
    first = m["splits"]["train"]["shards"][0]
    ds = datasets.Dataset.from_file(str(out / first["file"]))
    assert len(ds) == first["sequences"] and len(ds[0]["input_ids"]) == BLOCK
    assert ds.features["input_ids"].feature.dtype == "uint16"
    full = datasets.load_dataset("arrow", data_files={"train": str(out / "train-*.arrow")}, split="train")
    assert len(full) == m["splits"]["train"]["sequences"]
    # Each doc_starts offset points at a BOS token, and every BOS is listed.
    for row in ds.select(range(20)):
        ids, starts = row["input_ids"], row["doc_starts"]
        assert starts == [i for i, t in enumerate(ids) if t == 1]


# ------------------------------------------------------------------------------ outputs never touch inputs


def test_an_output_that_holds_the_corpus_is_refused_even_with_overwrite(tiny_merged, corpus, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "c.jsonl").write_bytes(Path(corpus).read_bytes())
    (d / "notes.txt").write_text("not a corpus, not ours")
    before = folder_bytes(d)
    for inputs, out, relation in (([str(d / "c.jsonl")], d, "contains"), ([str(d)], d, "is"),
                                  ([str(d)], d / "shards", "lies inside")):
        with pytest.raises(UserError, match=f"output {out} {relation} the corpus"):
            preprocess(cfg(tiny_merged, corpus, out, inputs=inputs, overwrite=True))
    with pytest.raises(UserError, match="contains the tokenizer"):
        preprocess(cfg(tiny_merged, corpus, tiny_merged.parent, overwrite=True))
    assert folder_bytes(d) == before and not (d / "shards").exists()


def folder_bytes(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_overwrite_deletes_only_a_shards_folder_this_project_made(tiny_merged, corpus, tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("years of work")
    with pytest.raises(UserError, match="did not create .* never deleted"):
        preprocess(cfg(tiny_merged, corpus, foreign, overwrite=True))
    assert (foreign / "chapter1.tex").read_text() == "years of work"
    # A folder of an earlier version (plan.json and manifest.json, no marker) is ours: replaced.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "plan.json").write_text('{"inputs": [], "chunks": [], "groups": [], "settings": {}}')
    (legacy / "manifest.json").write_text("{}")
    (legacy / "train-000000.arrow").write_bytes(b"old")
    with pytest.raises(UserError, match="other settings"):
        preprocess(cfg(tiny_merged, corpus, legacy))
    m = preprocess(cfg(tiny_merged, corpus, legacy, overwrite=True))
    fresh = tmp_path / "fresh"
    preprocess(cfg(tiny_merged, corpus, fresh))
    assert folder_digest(legacy) == folder_digest(fresh) and m["splits"]["train"]["sequences"] > 0
    from cllama_dist.files import MARKER

    assert json.loads((legacy / MARKER).read_text())["kind"] == "shards"


def test_one_line_errors_for_what_an_operator_gets_wrong(tiny_merged, corpus, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"afile is a file, not a folder"):
        preprocess(cfg(tiny_merged, corpus, tmp_path / "afile"))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    for tok, what in ((hf / "tokenizer.json", "is a JSON file"), (hf, "a folder without tokenizer.model"),
                      (Path(corpus), "not a SentencePiece model")):
        with pytest.raises(UserError, match=what):
            preprocess(cfg(tiny_merged, corpus, tmp_path / "o", tokenizer=str(tok)))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ inputs that change


def test_a_corpus_edited_in_place_is_refused_or_redone(tiny_merged, corpus, tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_bytes(Path(corpus).read_bytes())
    out = tmp_path / "o"
    preprocess(cfg(tiny_merged, src, out))
    old = folder_digest(out)
    data = bytearray(src.read_bytes())
    i = data.index("第".encode())
    data[i:i + 3] = "版".encode()  # same size, another character
    st = src.stat()
    src.write_bytes(bytes(data))
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its old modification time (cp -p, rsync -t)
    with pytest.raises(UserError, match=rf"made from other inputs: {src} changed \(its content differs\)"):
        preprocess(cfg(tiny_merged, src, out))
    assert folder_digest(out) == old
    os.utime(src)
    with pytest.raises(UserError, match=rf"{src} changed \(modified .* -> .*, its content differs\)"):
        preprocess(cfg(tiny_merged, src, out))
    preprocess(cfg(tiny_merged, src, out, overwrite=True))
    preprocess(cfg(tiny_merged, src, tmp_path / "fresh"))
    assert folder_digest(out) == folder_digest(tmp_path / "fresh") != old


def test_a_corpus_that_shrinks_during_the_run_is_an_error(tiny_merged, corpus, tmp_path, monkeypatch):
    import cllama_dist.data.preprocess as pp

    src = tmp_path / "c.jsonl"
    src.write_bytes(Path(corpus).read_bytes())
    size = src.stat().st_size
    real = pp.TextChunks.encode
    calls = []

    def encode_then_truncate(self, index, chunk, spill):
        calls.append(index)
        r = real(self, index, chunk, spill)
        if len(calls) == 1:  # another job rewrites the corpus while this one reads it
            with open(src, "r+b") as f:
                f.truncate(size * 88 // 100)
        return r

    monkeypatch.setattr(pp.TextChunks, "encode", encode_then_truncate)
    out = tmp_path / "o"
    with pytest.raises(UserError, match=rf"{src}: changed while being read \(size {size:,} -> {size * 88 // 100:,}"):
        preprocess(cfg(tiny_merged, src, out))
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.arrow.tmp")) and not list((out / ".tmp").glob("chunk-*"))


# ------------------------------------------------------------------------------ one writer per output


def test_a_second_writer_and_an_early_finalize_are_refused_naming_the_holder(tiny_merged, corpus, tmp_path):
    import os

    from cllama_dist.files import Lock

    out = tmp_path / "o"
    run_task(cfg(tiny_merged, corpus, out, num_tasks=3, task_id=0))
    # Another process holding task 1 of 3 (here: this process, which is alive, so its lock is live).
    holder = Lock(out / ".task-000001-of-000003.lock", "preprocess task 1 of 3").acquire()
    try:
        with pytest.raises(UserError, match=rf"cannot finalize {out}: .* another preprocess task 1 of 3: pid {os.getpid()}"):
            finalize(str(out))
        with pytest.raises(UserError, match=rf"another preprocess task 1 of 3: pid {os.getpid()}"):
            run_task(cfg(tiny_merged, corpus, out, num_tasks=3, task_id=1))
        # A plain single-task run covers every group, so it overlaps task 1's: refused as well.
        with pytest.raises(UserError, match="another preprocess task 1 of 3"):
            run_task(cfg(tiny_merged, corpus, out))
        with pytest.raises(UserError, match=rf"cannot replace {out}: .* task 1 of 3"):
            run_task(cfg(tiny_merged, corpus, out, block_size=128, overwrite=True))
        run_task(cfg(tiny_merged, corpus, out, num_tasks=3, task_id=2))  # disjoint groups: runs
    finally:
        holder.release()
    run_task(cfg(tiny_merged, corpus, out, num_tasks=3, task_id=1))
    finalize(str(out))
    one = tmp_path / "one"
    preprocess(cfg(tiny_merged, corpus, one))
    assert folder_digest(out) == folder_digest(one)


# ------------------------------------------------------------------------------ partial writes


def test_disk_full_says_so_removes_partial_files_and_resumes(tiny_merged, corpus, tmp_path, monkeypatch):
    import errno

    from cllama_dist.data.shards import ShardWriter

    real = ShardWriter._flush
    calls = {"n": 0}

    def flush_until_full(self, n):
        calls["n"] += 1
        if calls["n"] == 12:
            raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
        return real(self, n)

    monkeypatch.setattr(ShardWriter, "_flush", flush_until_full)
    out = tmp_path / "o"
    with pytest.raises(UserError) as exc:
        preprocess(cfg(tiny_merged, corpus, out))
    msg = str(exc.value)
    assert "\n" not in msg and ": disk full" in msg and ".arrow.tmp" in msg and "run the same command again" in msg
    committed = len(list((out / GROUPS).glob("group-*.json")))
    assert 0 < committed < len(json.loads((out / "plan.json").read_text())["groups"])
    assert not list(out.rglob("*.arrow.tmp")) and not list(out.rglob(".*.tmp")) and not list((out / ".tmp").iterdir())
    monkeypatch.setattr(ShardWriter, "_flush", real)
    preprocess(cfg(tiny_merged, corpus, out))
    preprocess(cfg(tiny_merged, corpus, tmp_path / "fresh"))
    assert folder_digest(out) == folder_digest(tmp_path / "fresh")


def test_a_committed_group_whose_shard_was_cut_short_is_redone(tiny_merged, corpus, tmp_path, capsys):
    out = tmp_path / "o"
    run_task(cfg(tiny_merged, corpus, out))
    victim = out / "train-000002.arrow"
    victim.write_bytes(victim.read_bytes()[:1000])  # a crash after the rename, before the data reached the disk
    preprocess(cfg(tiny_merged, corpus, out))
    assert f"redoing group 2 of {out}: its shard {victim} has 1,000 bytes" in capsys.readouterr().err
    preprocess(cfg(tiny_merged, corpus, tmp_path / "fresh"))
    assert folder_digest(out) == folder_digest(tmp_path / "fresh")


def test_text_sizes_add_up_to_a_direct_count(tiny_merged, corpus, tmp_path):
    """Per split: the characters and UTF-8 bytes in the shards' n_chars / n_bytes columns, plus the dropped tail's,
    equal a direct count over the split's documents, and each shard's columns add up to its manifest record."""
    out = tmp_path / "o"
    m = preprocess(cfg(tiny_merged, corpus, out))
    assert m["format"] == FORMAT == "cllama-shards/2" and m["columns"] == ["input_ids", "n_chars", "n_bytes"]
    direct = {"train": [0, 0], "validation": [0, 0]}
    for line in Path(corpus).read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        d = direct[("train", "validation")[split_of(text, 0.1, 0)]]
        d[0] += len(text)
        d[1] += len(text.encode("utf-8"))
    for split in ("train", "validation"):
        info = m["splits"][split]
        chars, nbytes = text_sizes(out, m, split)
        assert len(chars) == info["sequences"] and (chars > 0).all()
        assert int(chars.sum()) == info["characters"] == sum(x["characters"] for x in info["shards"])
        assert int(nbytes.sum()) == info["utf8_bytes"]
        assert info["characters"] + info["dropped_tail_characters"] == direct[split][0]
        assert info["utf8_bytes"] + info["dropped_tail_utf8_bytes"] == direct[split][1]
    verify_shards(out, m, checksums=True)  # the new columns pass verification, their sums checked


def test_token_sizes_spread_each_document_exactly():
    # documents of 4, 0 and 3 tokens holding 10, 2 and 3 characters (bytes: twice that)
    lengths = np.array([4, 0, 3])
    sizes = np.array([[10, 20], [2, 4], [3, 6]])
    per = token_sizes(lengths, sizes, 0, 7)
    # first document: floor(10 (t+1) / 4) - floor(10 t / 4) = 2, 3, 2, 3; the empty one's 2 go to the token before it
    assert per[:, 0].tolist() == [2, 3, 2, 3 + 2, 1, 1, 1]
    assert per.sum(axis=0).tolist() == [15, 30]
    assert token_sizes(lengths, sizes, 2, 5).tolist() == per[2:5].tolist()  # any slice: the same credits


def test_packer_rows_carry_their_text_sizes():
    class Sink:
        rows, sizes = [], []

        def add(self, rows, starts, sizes):
            self.rows.append(rows)
            self.sizes.append(sizes)

    sink = Sink()
    p = Packer(3, np.dtype(np.uint16), sink, boundaries=False, sizes=True)
    p.feed(np.arange(7, dtype=np.uint16), np.array([4, 3]), np.array([[10, 20], [3, 6]]))
    got = np.concatenate(sink.sizes)
    assert got[:, 0].tolist() == [2 + 3 + 2, 3 + 1 + 1] and p.remainder()["sizes"] == [[1, 2]]
