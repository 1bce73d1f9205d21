"""Shards as the trainer and eval read them: every kind of damage named, subsets for ranks, a record that spares
a resume the re-hashing, and memory that does not grow with the corpus (the shards are mapped, not loaded)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from cllama_dist.data.loader import TokenBlocks
from cllama_dist.data.shards import (FORMAT, MANIFEST, ShardWriter, shard_subsets, shard_tokens, verify_shards)
from cllama_dist.errors import UserError

VOCAB = 1000


def write_set(folder: Path, rows_per_shard: list[int], block: int = 64, seed: int = 0,
              split_of: dict | None = None) -> dict:
    """Shards of random ids < VOCAB written by the preprocessor's writer, and their manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits: dict = {"train": [], "validation": []}
    for k, rows in enumerate(rows_per_shard):
        split = (split_of or {}).get(k, "train")
        w = ShardWriter(folder / f"{split}-{k:06d}.arrow", block, np.dtype(np.uint16), False)
        for a in range(0, rows, 5000):  # several add() calls: batches cross them, as in the preprocessor
            w.add(rng.integers(0, VOCAB, (min(5000, rows - a), block), dtype=np.uint16))
        splits[split].append(w.close())
    manifest = {"format": FORMAT, "tokenizer": {"vocab_size": VOCAB, "sha256": "0" * 64}, "block_size": block,
                "dtype": "uint16", "columns": ["input_ids"],
                "splits": {s: {"shards": v, "sequences": sum(x["sequences"] for x in v)} for s, v in splits.items()}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("shards")
    return d, write_set(d, [3000, 1024, 5, 2500, 700], split_of={4: "validation"})


def shard_of(manifest: dict, k: int = 0, split: str = "train") -> dict:
    return manifest["splits"][split]["shards"][k]


def edited(manifest: dict, **change) -> dict:
    m = json.loads(json.dumps(manifest))
    for key, value in change.items():
        m[key] = value
    return m


# ------------------------------------------------------------------------------ verification


def test_a_good_set_verifies_in_full_and_by_subsets(small_set):
    folder, m = small_set
    every = sorted(x["file"] for s in m["splits"].values() for x in s["shards"])
    r = verify_shards(folder, m)
    assert r["shards"] == len(every) and r["bytes"] == sum(x["bytes"] for s in m["splits"].values() for x in s["shards"])
    for world in (1, 2, 3, 7):
        subsets = shard_subsets(m, world)
        assert sorted(f for sub in subsets for f in sub) == every  # each shard once, on exactly one rank
        assert sum(verify_shards(folder, m, which=(rank, world))["shards"] for rank in range(world)) == len(every)
    sizes = {x["file"]: x["bytes"] for s in m["splits"].values() for x in s["shards"]}
    loads = [sum(sizes[f] for f in sub) for sub in shard_subsets(m, 2)]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert verify_shards(folder, m, shards=[every[0]])["shards"] == 1
    with pytest.raises(UserError, match="names no shard nope.arrow"):
        verify_shards(folder, m, shards=["nope.arrow"])


def damage(folder: Path, m: dict, kind: str, tmp_path: Path) -> tuple[Path, dict, int]:
    """A copy of the set with one kind of damage; returns (folder, manifest, vocab to check against)."""
    import shutil

    d = tmp_path / kind
    shutil.copytree(folder, d)
    first = d / shard_of(m)["file"]
    vocab = VOCAB
    if kind == "missing":
        first.unlink()
    elif kind == "cut_short":
        first.write_bytes(first.read_bytes()[:-100])
    elif kind == "flipped_byte":
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 0x01  # a token id, same size, still parses
        first.write_bytes(bytes(data))
    elif kind == "block_size":
        m = edited(m, block_size=128)
    elif kind == "dtype":
        m = edited(m, dtype="uint32")
    elif kind == "sequences":
        m = json.loads(json.dumps(m))
        m["splits"]["train"]["shards"][0]["sequences"] -= 1
    elif kind == "vocab":
        vocab = 500  # shards of a larger tokenizer
    elif kind == "not_arrow":
        import hashlib

        junk = os.urandom(shard_of(m)["bytes"])
        first.write_bytes(junk)
        m = json.loads(json.dumps(m))
        m["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(junk).hexdigest()
    return d, m, vocab


DAMAGE = {
    "missing": r"shard {p} named in the manifest is missing",
    "cut_short": r"shard {p} has [\d,]+ bytes, the manifest says [\d,]+",
    "flipped_byte": r"shard {p} does not match its sha256 in the manifest",
    "block_size": r"shard {p}: its sequences hold 64 tokens, the manifest's block_size is 128",
    "dtype": r"shard {p}: its token ids are uint16, the manifest's dtype is uint32",
    "sequences": r"shard {p} holds 3,000 sequences, the manifest says 2,999",
    "vocab": r"shard {p}: sequence \d+ holds token id \d+, outside the tokenizer's 500 ids",
    "not_arrow": r"shard {p} (is not a readable Arrow stream|does not start with an Arrow schema)",
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_every_kind_of_damage_is_named(small_set, tmp_path, kind):
    folder, m = small_set
    d, m, vocab = damage(folder, m, kind, tmp_path)
    expected = DAMAGE[kind].format(p=re.escape(str(d / shard_of(m)["file"])))
    with pytest.raises(UserError, match=expected) as exc:
        verify_shards(d, m, vocab)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("kind", ["missing", "cut_short", "block_size", "dtype"])
def test_the_quick_check_catches_what_needs_no_full_read(small_set, tmp_path, kind):
    folder, m = small_set
    d, m, vocab = damage(folder, m, kind, tmp_path)
    with pytest.raises(UserError, match=DAMAGE[kind].format(p=re.escape(str(d / shard_of(m)["file"])))):
        verify_shards(d, m, vocab, checksums=False)


def test_a_record_spares_a_resume_the_rehash_but_never_vouches_for_a_changed_file(small_set, tmp_path):
    import shutil

    folder, m = small_set
    d = tmp_path / "s"
    shutil.copytree(folder, d)
    rec = tmp_path / "verified.json"
    n = sum(len(s["shards"]) for s in m["splits"].values())
    first_run = verify_shards(d, m, record=rec)
    assert first_run["shards"] == n and first_run["from_record"] == 0
    again = verify_shards(d, m, record=rec)
    assert again["from_record"] == n and again["shards"] == 0
    other = tmp_path / "other-vocab.json"
    rec.rename(other)
    assert verify_shards(d, m, 1001, record=other)["from_record"] == 0  # checked against another vocabulary: redone
    other.rename(rec)
    assert verify_shards(d, m, record=rec)["from_record"] == 0  # the record of vocab 1001 vouches for nothing here
    assert verify_shards(d, m, record=rec)["from_record"] == n
    first = d / shard_of(m)["file"]
    st = first.stat()
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0x01
    first.write_bytes(bytes(data))
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same modification time
    with pytest.raises(UserError, match="does not match its sha256"):
        verify_shards(d, m, record=rec)


# ------------------------------------------------------------------------------ the loader


def test_take_and_view_equal_the_rows_of_the_shards(small_set):
    folder, m = small_set
    blocks = TokenBlocks(folder, m, "train")
    reference = np.concatenate([shard_tokens(folder / s["file"]) for s in m["splits"]["train"]["shards"]])
    assert len(blocks) == len(reference) == m["splits"]["train"]["sequences"]
    rng = np.random.default_rng(1)
    for idx in (rng.integers(0, len(blocks), 300), np.arange(len(blocks)), np.array([0, len(blocks) - 1, 1023, 1024]),
                np.array([], dtype=np.int64)):
        got = blocks.take(idx)
        assert got.dtype == np.int64 and got.shape == (len(idx), 64)
        assert np.array_equal(got, reference[idx])
    for i in (0, 1023, 1024, 3000, 4028, len(blocks) - 1):
        assert np.array_equal(blocks.view(i), reference[i])
    with pytest.raises(IndexError):
        blocks.take(np.array([len(blocks)]))
    val = TokenBlocks(folder, m, "validation")
    assert np.array_equal(val.take(np.arange(len(val))), shard_tokens(folder / shard_of(m, 0, "validation")["file"]))


@pytest.mark.parametrize("kind", ["block_size", "dtype", "sequences", "missing", "cut_short"])
def test_the_loader_refuses_a_manifest_that_does_not_describe_its_shards(small_set, tmp_path, kind):
    folder, m = small_set
    d, m, _ = damage(folder, m, kind, tmp_path)
    p = re.escape(str(d / shard_of(m)["file"]))
    expected = {"cut_short": rf"shard {p} (ends without the Arrow end-of-stream marker|is not a readable Arrow stream)"}
    with pytest.raises(UserError, match=expected.get(kind, DAMAGE[kind].format(p=p))):
        TokenBlocks(d, m, "train")


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def test_rows_are_views_on_the_mapped_file_not_copies(small_set):
    folder, m = small_set
    blocks = TokenBlocks(folder, m, "train")
    for i in (0, 2000, 4028, len(blocks) - 1):
        v = blocks.view(i)
        shard = blocks.shards[int(np.searchsorted(blocks.starts, i, side="right") - 1)]
        addr = v.__array_interface__["data"][0]
        assert any(lo <= addr < hi for lo, hi in _mapped_ranges(shard.path.resolve())), "not on the file's mapping"
        assert not v.flags.writeable


def _status(field: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, RssAnon, VmHWM...)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def test_memory_does_not_grow_with_the_shards(tmp_path):
    """Start-up and 200 random rows over ~5 MB and ~100 MB of shards. The process's anonymous memory (where a
    copy would go) must not grow with the set; its RSS grows only by the file pages the rows touched (the
    kernel maps some 64-128 KB around each row read: about 20 MB here, whatever the size of the set), where
    loading the shards would add the whole set twice (the mapped pages read, then the copy)."""
    block = 256
    rows_per_mb = int(1e6 // (block * 2))
    growth = {}
    for mb in (5, 100):
        folder = tmp_path / f"set{mb}"
        m = write_set(folder, [5 * rows_per_mb] * (mb // 5), block=block, seed=mb)
        rss0, anon0 = _status("VmRSS"), _status("RssAnon")
        blocks = TokenBlocks(folder, m, "train")
        blocks.take(np.random.default_rng(0).integers(0, len(blocks), 200))
        growth[mb] = (_status("VmRSS") - rss0, _status("RssAnon") - anon0)
        del blocks
    for mb, (rss, anon) in growth.items():
        assert anon < 4e6, f"{mb} MB of shards grew anonymous memory by {anon / 1e6:.1f} MB: a copy"
    assert growth[100][0] - growth[5][0] < 40e6, growth


def test_verification_reads_without_mapping_the_shard(tmp_path):
    """A full check of a 40 MB shard must not add the shard to the process's peak RSS (a memory map touched
    page by page would)."""
    m = write_set(tmp_path, [int(40e6 // 128)], block=64)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status("VmHWM")
    verify_shards(tmp_path, m)
    assert _status("VmHWM") - before < 15e6


def test_the_global_order_is_the_seeded_permutation_in_four_bytes_a_sequence():
    from cllama_dist.data.loader import GlobalOrder

    for n, seed in ((1, 0), (7, 3), (1000, 0), (12345, 11)):
        order = GlobalOrder(n, seed)
        pos = np.arange(3 * n)
        expected = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(3)])
        assert np.array_equal(order.indices(pos), expected) and order.indices(pos).dtype == np.int64
    n = 20_000_000  # a 20 GB corpus of 512-token uint16 sequences: 160 MB per rank as int64
    anon = _status("RssAnon")
    order = GlobalOrder(n, 0)
    order.indices(np.array([0, n - 1, n]))
    assert _status("RssAnon") - anon < 100e6
