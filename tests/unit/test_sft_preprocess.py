"""Instruction data through `cllama preprocess-sft`: shards against a direct encoding of the records, masks token by
token, packing, determinism over tasks, skips and strict errors, refusals, outputs vs inputs, locks, a full disk,
and the shipped instruction set."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from cllama_dist.data.config import SFTPreprocessConfig
from cllama_dist.data.loader import SFTBlocks, TokenBlocks, position_ids, segment_ids
from cllama_dist.data.pipeline import GROUPS, split_of
from cllama_dist.data.sft import RowPacker, finalize, preprocess_sft, record_key, run_task
from cllama_dist.data.shards import (SFT_COLUMNS, SFT_FORMAT, SFTShardWriter, check_manifest, check_sft_manifest,
                                     load_manifest, load_sft_manifest, verify_shards)
from cllama_dist.errors import UserError
from cllama_dist.sft.encode import Encoded, encode_conversation
from cllama_dist.sft.pack import Block, pack_examples
from cllama_dist.sft.records import read_conversations
from cllama_dist.sft.shipped import instructions_dir, train_files
from cllama_dist.sft.templates import ALPACA_HEADER, LLAMA2_DEFAULT_SYSTEM, builtin
from cllama_dist.tokenizer.spm import fingerprint

from ..conftest import write_jsonl

D = instructions_dir()


def lines_of(name: str, n: int | None = None) -> list[dict]:
    return [json.loads(x) for x in (D / name).read_text(encoding="utf-8").splitlines()][:n]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small mixed set (copied from the shipped one): Alpaca JSON Lines, a JSON array, chat JSON Lines."""
    d = tmp_path_factory.mktemp("sftdata")
    write_jsonl(d / "a_general.jsonl", lines_of("general.jsonl", 150))
    (d / "b_mech.json").write_text(json.dumps(lines_of("mechanical_train.jsonl", 120), ensure_ascii=False, indent=1),
                                   encoding="utf-8")
    write_jsonl(d / "c_dialogues.jsonl", lines_of("dialogues.jsonl"))
    return d


def cfg(tok, inputs, out, **kw) -> SFTPreprocessConfig:
    base = dict(inputs=[str(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)], tokenizer=str(tok),
                output=str(out), max_length=128, chunk_mb=0.004, shard_size_mb=0.02, validation_fraction=0.1,
                workers=1)
    base.update(kw)
    return SFTPreprocessConfig(**base)


def sp_of(tok: Path):
    return spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))


def digest(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.arrow"))}


def rows_of(out: Path, split: str):
    m = load_sft_manifest(out)
    blocks = SFTBlocks(out, m, split)
    return blocks.take(np.arange(len(blocks))) if len(blocks) else None


def examples_of(rows) -> list[tuple[list[int], list[int]]]:
    """Each row cut back into its examples (ids, mask), in order."""
    out = []
    for r in range(len(rows.n_tokens)):
        bounds = list(rows.example_starts[r]) + [int(rows.n_tokens[r])]
        for a, z in zip(bounds, bounds[1:]):
            out.append((rows.input_ids[r, a:z].tolist(), rows.loss_mask[r, a:z].tolist()))
    return out


def expected(tok, files, template, max_len, fraction=0.1, seed=0, system=None) -> dict[str, list[Encoded]]:
    """The reference: every record read by the records module, split by its key, encoded on its own."""
    sp = sp_of(tok)
    out: dict[str, list] = {"train": [], "validation": []}
    for f in sorted(map(str, files)):
        for conv in read_conversations(f, "auto"):
            split = ("train", "validation")[split_of(record_key(conv), fraction, seed)]
            if system is not None and conv.system is None:
                conv = type(conv)(conv.turns, system)
            r = encode_conversation(conv, builtin(template), sp, max_len)
            if isinstance(r, Encoded):
                out[split].append(r)
    return out


# ------------------------------------------------------------------------------ the token stream


@pytest.mark.parametrize("layout,template,block", [("padded", "alpaca", 128), ("packed", "llama2", 256)])
def test_shard_stream_equals_direct_encoding(tiny_merged, data, tmp_path, layout, template, block):
    out = tmp_path / "o"
    m = preprocess_sft(cfg(tiny_merged, data, out, layout=layout, template=template, max_length=block))
    want = expected(tiny_merged, data.iterdir(), template, block)
    assert m["plan"]["groups"] >= 3 and len(want["validation"]) > 5
    sp = sp_of(tiny_merged)
    pad = sp.unk_id()
    assert m["pad_id"] == pad and m["template"]["source"] == builtin(template).source
    for split in ("train", "validation"):
        rows = rows_of(out, split)
        got = examples_of(rows)
        assert got == [(e.input_ids, e.loss_mask) for e in want[split]]
        info = m["splits"][split]
        assert info["examples"] == len(got) and info["rows"] == len(rows.n_tokens)
        assert info["tokens"] == sum(len(e.input_ids) for e in want[split]) == int(rows.n_tokens.sum())
        assert info["response_tokens"] == sum(sum(e.loss_mask) for e in want[split])
        cols = np.arange(block)[None, :]
        pad_area = cols >= rows.n_tokens[:, None]
        assert (rows.input_ids[pad_area] == pad).all() and (rows.loss_mask[pad_area] == 0).all()
        if layout == "padded":
            assert all(len(s) == 1 for s in rows.example_starts)
        else:
            assert len(rows.n_tokens) < info["examples"]  # several examples share rows
    verify_shards(out, m)
    check_sft_manifest(m, fingerprint(tiny_merged), block, template_sha256=builtin(template).sha256)


def test_packed_rows_are_pack_examples_and_never_split(tiny_merged, data, tmp_path):
    out = tmp_path / "o"
    m = preprocess_sft(cfg(tiny_merged, data, out, layout="packed", template="llama2", shard_size_mb=100,
                           validation_fraction=0, max_length=256))
    assert m["plan"]["groups"] == 1
    want = expected(tiny_merged, data.iterdir(), "llama2", 256, fraction=0)["train"]
    blocks = list(pack_examples(want, 256, sp_of(tiny_merged).unk_id()))
    rows = rows_of(out, "train")
    assert len(blocks) == len(rows.n_tokens)
    for r, b in enumerate(blocks):
        assert rows.input_ids[r].tolist() == b.input_ids and rows.loss_mask[r].tolist() == b.loss_mask
        assert rows.example_starts[r].tolist() == b.example_starts and rows.n_tokens[r] == b.n_tokens
        # Every example starts with BOS, exactly at its offset: none is split across rows.
        assert [i for i in b.example_starts if rows.input_ids[r, i] == 1] == b.example_starts
    # The trainer's helpers: positions restart per example (as pack.Block's), segments number the examples.
    pos, seg = position_ids(rows), segment_ids(rows)
    for r in (0, len(blocks) // 2, len(blocks) - 1):
        assert pos[r].tolist() == blocks[r].position_ids()
        lens = blocks[r].example_lengths()
        assert seg[r].tolist() == [k + 1 for k, n in enumerate(lens) for _ in range(n)] + [0] * (256 - sum(lens))


def test_row_packer_fed_in_pieces_equals_pack_examples(tmp_path):
    rng = random.Random(0)
    examples = [([rng.randrange(3, 90) for _ in range(n)], [rng.randrange(2) for _ in range(n)])
                for n in [rng.randrange(1, 33) for _ in range(400)] + [32, 32, 1]]
    for layout in ("packed", "padded"):
        w = SFTShardWriter(tmp_path / f"{layout}.arrow", 32, np.dtype(np.uint16))
        p = RowPacker(layout, 32, 0, np.dtype(np.uint16), w)
        k = 0
        while k < len(examples):
            piece = examples[k:k + rng.randrange(0, 40)]
            k += len(piece)
            p.feed(np.array([t for e in piece for t in e[0]], np.uint16), np.array([t for e in piece for t in e[1]],
                   np.uint8), np.array([len(e[0]) for e in piece], np.int64))
        p.finish()
        rec = w.close()
        from cllama_dist.data.shards import MappedSFTShard

        ref = list(pack_examples(examples, 32, 0)) if layout == "packed" else [
            Block(e[0] + [0] * (32 - len(e[0])), e[1] + [0] * (32 - len(e[0])), [0], len(e[0])) for e in examples]
        shard = MappedSFTShard(tmp_path / f"{layout}.arrow", 32, np.uint16, rec["rows"], SFT_COLUMNS)
        assert shard.rows == len(ref) == rec["rows"] and rec["examples"] == len(examples)
        ids = np.concatenate(shard.batches())
        assert ids.tolist() == [b.input_ids for b in ref]


# ------------------------------------------------------------------------------ masks, token by token


def test_masks_cover_exactly_the_responses(tiny_merged, tmp_path):
    sp = sp_of(tiny_merged)
    BOS, EOS = sp.bos_id(), sp.eos_id()
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "把下面的词倒过来写", "input": "天气", "output": "气天"}])
    write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "一加一等于几？"},
        {"role": "assistant", "content": "等于二。"}]}])

    def run(name, template):
        out = tmp_path / f"{name}-{template}"
        preprocess_sft(cfg(tiny_merged, tmp_path / f"{name}.jsonl", out, template=template, validation_fraction=0))
        rows = rows_of(out, "train")
        n = int(rows.n_tokens[0])
        return rows.input_ids[0, :n].tolist(), rows.loss_mask[0, :n].tolist()

    # The paper's v1 stream: [BOS] + sp(source) then sp(output) + [EOS], labels only on the latter.
    source = f"{ALPACA_HEADER}\n\n### Instruction:\n把下面的词倒过来写\n天气\n\n### Response: "
    prompt, answer = [BOS] + sp.encode(source), sp.encode("气天") + [EOS]
    assert run("a", "alpaca") == (prompt + answer, [0] * len(prompt) + [1] * len(answer))
    v2 = f"[INST] <<SYS>>\n{LLAMA2_DEFAULT_SYSTEM}\n<</SYS>>\n\n把下面的词倒过来写\n天气 [/INST]"
    prompt = [BOS] + sp.encode(v2)
    assert run("a", "llama2") == (prompt + answer, [0] * len(prompt) + [1] * len(answer))
    # Two turns: every assistant turn and its EOS carry loss, nothing else (BOS, system, both user turns).
    p1 = [BOS] + sp.encode("[INST] <<SYS>>\n你是助手。\n<</SYS>>\n\n你好 [/INST]")
    a1 = sp.encode("你好！") + [EOS]
    p2 = [BOS] + sp.encode("[INST] 一加一等于几？ [/INST]")
    a2 = sp.encode("等于二。") + [EOS]
    ids, mask = run("c", "llama2")
    assert ids == p1 + a1 + p2 + a2
    assert mask == [0] * len(p1) + [1] * len(a1) + [0] * len(p2) + [1] * len(a2)


# ------------------------------------------------------------------------------ determinism


def test_three_tasks_equal_one_run_and_the_split_ignores_order(tiny_merged, data, tmp_path):
    one = tmp_path / "one"
    preprocess_sft(cfg(tiny_merged, data, one, layout="packed"))
    three = tmp_path / "three"
    for k in (2, 0, 1):
        assert run_task(cfg(tiny_merged, data, three, layout="packed", num_tasks=3, task_id=k))["ran"]
    finalize(str(three))
    assert digest(one) == digest(three) and len(digest(one)) >= 4
    a, b = load_sft_manifest(one), load_sft_manifest(three)
    a.pop("created"), b.pop("created")
    assert a == b
    # Records in another order: the same records in each split.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    recs = lines_of("general.jsonl", 150)
    write_jsonl(shuffled / "g.jsonl", recs[::-1])
    write_jsonl(tmp_path / "g.jsonl", recs)
    s1 = preprocess_sft(cfg(tiny_merged, tmp_path / "g.jsonl", tmp_path / "s1"))
    s2 = preprocess_sft(cfg(tiny_merged, shuffled / "g.jsonl", tmp_path / "s2"))
    val = [sorted(map(repr, examples_of(rows_of(tmp_path / s, "validation")))) for s in ("s1", "s2")]
    assert val[0] == val[1] and s1["splits"]["validation"]["examples"] == s2["splits"]["validation"]["examples"] > 0


# ------------------------------------------------------------------------------ bad records


def test_skips_counted_by_reason_with_their_first_line_and_strict_names_it(tiny_merged, tmp_path):
    good = [{"instruction": f"第{i}个问题", "input": "", "output": f"第{i}个回答"} for i in range(300)]
    bad = [
        b"\xff\xfe not utf-8",
        b'{"instruction": "x", "output": ',
        b'["a list"]',
        json.dumps({"instruction": "x"}).encode(),
        json.dumps({"instruction": 3, "output": "y"}).encode(),
        json.dumps({"instruction": " ", "input": "", "output": "y"}).encode(),
        json.dumps({"instruction": "x", "output": "  "}).encode(),
        json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(),
        json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode(),
        json.dumps({"instruction": "长" * 400, "output": "y"}, ensure_ascii=False).encode(),
        json.dumps({"instruction": "x\ue000", "output": "y"}, ensure_ascii=False).encode(),
    ]
    reasons = ["invalid_utf8", "malformed_json", "malformed_record", "missing_field", "non_string", "empty_prompt",
               "empty_response", "unknown_role", "role_order", "prompt_too_long", "unrenderable"]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good[:200]] + bad + \
            [json.dumps(r, ensure_ascii=False).encode() for r in good[200:]]
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    m = preprocess_sft(cfg(tiny_merged, p, tmp_path / "o", chunk_mb=0.002))
    assert m["plan"]["chunks"] > 3  # the bad lines are far into the file: their lines are counted across chunks
    assert m["skipped"] == {**{r: 0 for r in m["skipped"]}, **{r: 1 for r in reasons}}
    assert m["skipped_first"] == {r: f"{p}:{201 + k}" for k, r in enumerate(reasons)}
    assert m["totals"]["records"] == 311 and m["totals"]["examples"] == 300
    with pytest.raises(UserError, match=rf"^{p}:201: invalid UTF-8 .*drop --strict"):
        preprocess_sft(cfg(tiny_merged, p, tmp_path / "s", chunk_mb=0.002, strict=True))
    p2 = tmp_path / "long.jsonl"
    p2.write_bytes(b"\n".join(lines[:200] + [bad[9]]) + b"\n")
    with pytest.raises(UserError, match=rf"^{p2}:201: its prompt alone fills max_length 128"):
        preprocess_sft(cfg(tiny_merged, p2, tmp_path / "s2", chunk_mb=0.002, strict=True))
    long_answer = tmp_path / "answer.json"  # a JSON array: read whole, lines from the records module
    long_answer.write_text(json.dumps(good[:3] + [{"instruction": "x", "output": "长" * 400}], ensure_ascii=False,
                                      indent=1), encoding="utf-8")
    m = preprocess_sft(cfg(tiny_merged, long_answer, tmp_path / "t"))
    assert m["totals"]["truncated"] == 1 and m["totals"]["examples"] == 4
    m = preprocess_sft(cfg(tiny_merged, long_answer, tmp_path / "k", overflow="skip"))
    assert m["skipped"]["too_long"] == 1 and m["skipped_first"] == {"too_long": f"{long_answer}:17"}
    with pytest.raises(UserError, match=rf"^{long_answer}:17: .* more than max_length 128 \(overflow skip\)"):
        preprocess_sft(cfg(tiny_merged, long_answer, tmp_path / "k2", overflow="skip", strict=True))


# ------------------------------------------------------------------------------ refusals


def test_refusals_name_the_file_and_the_problem(tiny_merged, data, tmp_path):
    inputs = data / "a_general.jsonl"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (tmp_path / "vocab.txt").write_text("hello 1\n")
    for tok, what in ((hf / "tokenizer.json", "is a JSON file .* not the merged SentencePiece model"),
                      (hf, "holds a tokenizer.json but no tokenizer.model"),
                      (tmp_path / "vocab.txt", "not a SentencePiece model")):
        with pytest.raises(UserError, match=what):
            preprocess_sft(cfg(tok, inputs, tmp_path / "o"))
    (tmp_path / "t.json").write_text('{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}')
    (tmp_path / "fmt.jinja").write_text("### Instruction:\n{instruction}\n\n### Response: ")
    (tmp_path / "user_only.jinja").write_text("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}"
                                              "{% endif %}{% endfor %}")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}")
    for template, what in ((tmp_path / "t.json", "is a JSON file, not a Jinja template"),
                           (tmp_path / "fmt.jinja", "never uses `messages`: not a Jinja chat template"),
                           (tmp_path / "user_only.jinja", "does not render the assistant's message as a response"),
                           (tmp_path / "broken.jinja", "does not compile"),
                           (tmp_path / "none.jinja", "chat template file not found"),
                           ("vicuna", "unknown template 'vicuna'")):
        with pytest.raises(UserError, match=what):
            preprocess_sft(cfg(tiny_merged, inputs, tmp_path / "o", template=str(template)))
    write_jsonl(tmp_path / "pretrain.jsonl", [{"text": "一段文字"}] * 10)
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "prose.jsonl").write_text("这不是 JSON\n也不是\n")
    foreign = r"pretrain.jsonl:1: neither an Alpaca-style record .* its fields are 'text'"
    for bad, what in ((tmp_path / "pretrain.jsonl", foreign),
                      (tmp_path / "notes.txt", "instruction data is JSON .* not txt"),
                      (tmp_path / "prose.jsonl", "not instruction data: none of its first lines is JSON")):
        with pytest.raises(UserError, match=what):
            preprocess_sft(cfg(tiny_merged, bad, tmp_path / "o"))
    with pytest.raises(UserError, match=r"chat.jsonl:1: not a chat record \(field 'messages'\)"):
        write_jsonl(tmp_path / "chat.jsonl", lines_of("general.jsonl", 3))
        preprocess_sft(cfg(tiny_merged, tmp_path / "chat.jsonl", tmp_path / "o", format="chat"))
    with pytest.raises(UserError, match="max_length: must be at least 16 tokens, got 8"):
        cfg(tiny_merged, inputs, tmp_path / "o", max_length=8)
    assert not (tmp_path / "o").exists()


def test_the_tokenizers_own_template_and_a_jinja_file(tiny_merged, data, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in tiny_merged.iterdir():
        if f.is_file():
            (tok / f.name).write_bytes(f.read_bytes())
    from cllama_dist.sft.templates import install_chat_template

    install_chat_template(tok, builtin("llama2"))
    (tmp_path / "v2.jinja").write_text(builtin("llama2").source, encoding="utf-8")
    inputs = data / "c_dialogues.jsonl"
    a = preprocess_sft(cfg(tok, inputs, tmp_path / "a", template="tokenizer"))
    b = preprocess_sft(cfg(tiny_merged, inputs, tmp_path / "b", template=str(tmp_path / "v2.jinja")))
    c = preprocess_sft(cfg(tiny_merged, inputs, tmp_path / "c", template="llama2"))
    assert a["template"]["sha256"] == b["template"]["sha256"] == c["template"]["sha256"]
    assert digest(tmp_path / "a") == digest(tmp_path / "b") == digest(tmp_path / "c")
    assert (a["template"]["name"], b["template"]["name"]) == ("tokenizer", "v2")


# ------------------------------------------------------------------------------ outputs, locks, full disk


def test_outputs_never_touch_inputs_and_only_our_kind_is_replaced(tiny_merged, tiny_shards, data, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_bytes((data / "a_general.jsonl").read_bytes())
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for inputs, out, relation in (([d / "a.jsonl"], d, "contains"), ([d], d, "is"), ([d], d / "o", "lies inside")):
        with pytest.raises(UserError, match=f"output {out} {relation} the instruction data"):
            preprocess_sft(cfg(tiny_merged, inputs, out, overwrite=True))
    with pytest.raises(UserError, match="contains the tokenizer"):
        preprocess_sft(cfg(tiny_merged, d, tiny_merged.parent, overwrite=True))
    (tmp_path / "v2.jinja").write_text(builtin("llama2").source, encoding="utf-8")
    with pytest.raises(UserError, match="is the chat template"):
        preprocess_sft(cfg(tiny_merged, d, tmp_path / "v2.jinja", template=str(tmp_path / "v2.jinja")))
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "ch1.tex").write_text("years of work")
    with pytest.raises(UserError, match="did not create .* never deleted"):
        preprocess_sft(cfg(tiny_merged, d, foreign, overwrite=True))
    # A pre-training shards folder is another kind: not replaced, even with --overwrite.
    with pytest.raises(UserError, match=r"holds cllama-dist output of another kind \(shards\)"):
        preprocess_sft(cfg(tiny_merged, d, tiny_shards, overwrite=True))
    out = tmp_path / "o"
    preprocess_sft(cfg(tiny_merged, d, out))
    with pytest.raises(UserError, match="max_length 128 there, 64 now"):
        preprocess_sft(cfg(tiny_merged, d, out, max_length=64))
    assert preprocess_sft(cfg(tiny_merged, d, out, max_length=64, overwrite=True))["block_size"] == 64
    # Each manifest kind is refused where the other is expected, naming both.
    with pytest.raises(UserError, match=r"instruction-tuning shards .* expected pre-training shards"):
        load_manifest(out)
    with pytest.raises(UserError, match=r"pre-training shards .* expected instruction-tuning shards"):
        load_sft_manifest(tiny_shards)
    with pytest.raises(UserError, match="read them with SFTBlocks"):
        TokenBlocks(out, load_sft_manifest(out), "train")
    # An input edited since the plan: refused, naming it (the same plan checks as pre-training).
    with open(d / "a.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"instruction": "新问题", "output": "新回答"}, ensure_ascii=False) + "\n")
    with pytest.raises(UserError, match=rf"made from other inputs: {d / 'a.jsonl'} changed \(size"):
        preprocess_sft(cfg(tiny_merged, d, out, max_length=64))


def test_a_second_writer_and_an_early_finalize_are_refused(tiny_merged, data, tmp_path):
    from cllama_dist.files import Lock

    out = tmp_path / "o"
    run_task(cfg(tiny_merged, data, out, num_tasks=3, task_id=0))
    with pytest.raises(UserError, match="groups are not finished"):
        finalize(str(out))
    holder = Lock(out / ".task-000001-of-000003.lock", "preprocess-sft task 1 of 3").acquire()
    try:
        with pytest.raises(UserError, match=rf"cannot finalize {out}: .* another preprocess-sft task 1 of 3: "
                                            rf"pid {os.getpid()}"):
            finalize(str(out))
        with pytest.raises(UserError, match="another preprocess-sft task 1 of 3"):
            run_task(cfg(tiny_merged, data, out))
        run_task(cfg(tiny_merged, data, out, num_tasks=3, task_id=2))
    finally:
        holder.release()
    run_task(cfg(tiny_merged, data, out, num_tasks=3, task_id=1))
    from cllama_dist.data.preprocess import finalize as finalize_pretraining

    with pytest.raises(UserError, match=r"holds sft-shards output, not shards: finalize it with `cllama "
                                        r"preprocess-sft finalize`"):
        finalize_pretraining(str(out))
    finalize(str(out))
    preprocess_sft(cfg(tiny_merged, data, tmp_path / "one"))
    assert digest(out) == digest(tmp_path / "one")


def test_disk_full_says_so_removes_partial_files_and_resumes(tiny_merged, data, tmp_path, monkeypatch):
    real = SFTShardWriter._flush
    calls = {"n": 0}

    def flush_until_full(self, n):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, n)

    monkeypatch.setattr(SFTShardWriter, "_flush", flush_until_full)
    out = tmp_path / "o"
    with pytest.raises(UserError) as exc:
        preprocess_sft(cfg(tiny_merged, data, out))
    msg = str(exc.value)
    assert "\n" not in msg and ": disk full" in msg and ".arrow.tmp" in msg and "run the same command again" in msg
    committed = len(list((out / GROUPS).glob("group-*.json")))
    assert 0 < committed < len(json.loads((out / "plan.json").read_text())["groups"])
    assert not list(out.rglob("*.arrow.tmp")) and not list((out / ".tmp").iterdir())
    monkeypatch.setattr(SFTShardWriter, "_flush", real)
    preprocess_sft(cfg(tiny_merged, data, out))
    preprocess_sft(cfg(tiny_merged, data, tmp_path / "fresh"))
    assert digest(out) == digest(tmp_path / "fresh")


# ------------------------------------------------------------------------------ verification and the reader


def _one_shard(folder: Path, rows: list[tuple[list[int], list[int], list[int], int]], block: int = 8) -> dict:
    w = SFTShardWriter(folder / "train-000000.arrow", block, np.dtype(np.uint16))
    for ids, mask, starts, n in rows:
        w.add(np.array([ids], np.uint16), np.array([mask], np.uint8), np.array([n]), np.array(starts),
              np.array([len(starts)]))
    shard = w.close()
    return {"format": SFT_FORMAT, "tokenizer": {"vocab_size": 100, "sha256": "0" * 64}, "block_size": block,
            "dtype": "uint16", "columns": SFT_COLUMNS, "layout": "packed",
            "splits": {"train": {"shards": [shard]}, "validation": {"shards": []}}}


def test_verification_names_each_broken_row_invariant(tmp_path):
    ok = ([1, 5, 6, 1, 7, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0, 0], [0, 3], 5)
    cases = {
        "ok": [ok],
        "id": [([1, 5, 100, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0], [0], 3)],
        "mask2": [([1, 5, 6, 0, 0, 0, 0, 0], [0, 2, 1, 0, 0, 0, 0, 0], [0], 3)],
        "pad_loss": [([1, 5, 6, 0, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0], [0], 3)],
        "unsorted": [ok, ([1, 5, 6, 1, 7, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0, 0], [0, 3, 3], 5)],
        "not_zero": [([1, 5, 6, 1, 7, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0, 0], [1, 3], 5)],
        "past_end": [([1, 5, 6, 1, 7, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0, 0], [0, 5], 5)],
        "n_tokens": [([1, 5, 6, 1, 7, 0, 0, 0], [0, 1, 1, 0, 1, 0, 0, 0], [0], 9)],
    }
    messages = {"id": "row 0 holds token id 100, outside the tokenizer's 100 ids",
                "mask2": "loss_mask holds 2", "pad_loss": "row 0: loss_mask is 1 on padding",
                "unsorted": "row 1: example_starts not strictly increasing",
                "not_zero": "row 0: example_starts does not begin at 0",
                "past_end": "row 0: an example starts at or after n_tokens", "n_tokens": "row 0: n_tokens outside 1..8"}
    for name, rows in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        m = _one_shard(folder, rows)
        if name == "ok":
            verify_shards(folder, m)
            blocks = SFTBlocks(folder, m, "train")
            r = blocks.view(0)
            assert r.input_ids[0].tolist() == ok[0] and r.example_starts[0].tolist() == [0, 3] and r.n_tokens[0] == 5
            with pytest.raises(UserError, match="holds 5 tokens, the manifest says 6"):
                bad = json.loads(json.dumps(m))
                bad["splits"]["train"]["shards"][0]["tokens"] = 6
                verify_shards(folder, bad)
            with pytest.raises(UserError, match="more than one example"):
                verify_shards(folder, {**m, "layout": "padded"})
            continue
        with pytest.raises(UserError, match=messages[name]):
            verify_shards(folder, m)
    with pytest.raises(UserError, match="is not instruction-tuning shards"):
        check_sft_manifest({"format": "cllama-shards/1"}, {}, 8)


def test_check_sft_manifest_names_tokenizer_block_and_template(tiny_merged, tiny_base, data, tmp_path):
    m = preprocess_sft(cfg(tiny_merged, data / "c_dialogues.jsonl", tmp_path / "o"))
    check_manifest(m, fingerprint(tiny_merged), 128)
    with pytest.raises(UserError) as exc:
        check_sft_manifest(m, fingerprint(tiny_base), 256)
    assert "block size: shards 128, config 256" in str(exc.value) and "vocab size" in str(exc.value)
    with pytest.raises(UserError, match="rendered with chat template alpaca"):
        check_sft_manifest(m, fingerprint(tiny_merged), 128, template_sha256=builtin("llama2").sha256)


# ------------------------------------------------------------------------------ the shipped set, the CLI


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_the_shipped_instruction_set(tiny_merged, tmp_path, layout):
    import datasets

    out = tmp_path / "o"
    m = preprocess_sft(cfg(tiny_merged, train_files(), out, layout=layout, max_length=256, chunk_mb=16,
                           shard_size_mb=256, validation_fraction=0.02))
    n_records = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in train_files())
    t, v = m["splits"]["train"], m["splits"]["validation"]
    assert m["totals"]["records"] == n_records == t["examples"] + v["examples"] and m["totals"]["skipped"] == 0
    assert m["totals"]["truncated"] == 0 and v["examples"] > 0
    assert (t["rows"] == t["examples"]) == (layout == "padded")
    verify_shards(out, m)
    rec = [tmp_path / f"rank-{k}.json" for k in range(2)]
    shares = [verify_shards(out, m, which=(k, 2), record=rec[k])["shards"] for k in range(2)]
    assert sum(shares) == len(t["shards"]) + len(v["shards"])
    assert [verify_shards(out, m, which=(k, 2), record=rec[k])["from_record"] for k in range(2)] == shares
    ds = datasets.Dataset.from_file(str(out / t["shards"][0]["file"]))
    assert len(ds) == t["shards"][0]["rows"] and len(ds[0]["input_ids"]) == 256 and ds[0]["example_starts"][0] == 0
    print(f"\nshipped set, {layout}: {json.dumps({k: m['totals'][k] for k in m['totals']})}; train rows {t['rows']}, "
          f"validation rows {v['rows']}")


def test_cli_and_yaml(tiny_merged, data, tmp_path, capsys):
    from cllama_dist.cli import main

    y = tmp_path / "sft.yaml"
    y.write_text(f"inputs: [{data / 'c_dialogues.jsonl'}]\ntokenizer: {tiny_merged}\ntemplate: llama2\n"
                 f"max_length: 96\nlayout: packed\nworkers: 1\noutput: {tmp_path / 'o'}\n")
    for k in range(2):
        assert main(["preprocess-sft", "--config", str(y), "--num-tasks", "2", "--task-id", str(k)]) == 0
    assert "cllama preprocess-sft finalize" in capsys.readouterr().out
    assert main(["preprocess-sft", "finalize", "--config", str(y)]) == 0
    out = capsys.readouterr().out
    assert "packed rows of 96 tokens" in out and "template llama2" in out
    assert main(["preprocess-sft", "--config", str(y), "--output", str(tmp_path / "x"), "--max-length", "8"]) == 2
    assert "--max-length: must be at least 16 tokens" in capsys.readouterr().err


def test_compressed_inputs_read_as_the_plain_ones(tiny_merged, data, tmp_path):
    import gzip

    plain, packed = tmp_path / "plain", tmp_path / "gz"
    plain.mkdir()
    packed.mkdir()
    for f in data.iterdir():
        (plain / f.name).write_bytes(f.read_bytes())
        with gzip.open(packed / (f.name + ".gz"), "wb") as g:
            g.write(f.read_bytes())
    a = preprocess_sft(cfg(tiny_merged, plain, tmp_path / "a", shard_size_mb=100))
    b = preprocess_sft(cfg(tiny_merged, packed, tmp_path / "b", shard_size_mb=100))
    assert a["plan"]["chunks"] > b["plan"]["chunks"] == 3  # a compressed file is one chunk
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert [i["format"] for i in b["inputs"]] == ["jsonl", "json", "jsonl"]
