import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cllama_dist.data.corpus import RecordReader, resolve_inputs
from cllama_dist.errors import UserError

from ..conftest import write_jsonl

DOCS = ["第一篇文章。", "第二篇：科学与技术。", "第三篇，讲历史。", "Mixed 中英 text 123。"]


def read_all(paths, **kw):
    reader = RecordReader(**kw)
    docs = [d.text for src in resolve_inputs([str(p) for p in paths]) for d in reader.read(src)]
    return docs, reader.skipped.as_dict()


def test_formats_and_compression(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"content": d}, ensure_ascii=False) + "\n" for d in DOCS))
    (tmp_path / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(DOCS) + "\n").encode()))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "e.parquet", row_group_size=2)
    for name in ("a.txt", "b.jsonl", "d.txt.zst", "e.parquet"):
        assert read_all([tmp_path / name])[0] == DOCS, name
    assert read_all([tmp_path / "c.jsonl.gz"], text_field="content")[0] == DOCS
    # A folder is searched recursively, files in sorted order; a glob works too.
    docs, _ = read_all([tmp_path], text_field="text")
    assert len(docs) == 4 * len(DOCS)  # c.jsonl.gz has no "text" field: skipped
    assert read_all([str(tmp_path / "*.txt")])[0] == DOCS


def test_compressed_parquet(tmp_path):
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "e.parquet")
    raw = (tmp_path / "e.parquet").read_bytes()
    (tmp_path / "f.parquet.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    assert read_all([tmp_path / "f.parquet.zst"])[0] == DOCS


def test_bad_records_are_counted(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "好"}).encode(),
        b'{"text": "\xff\xfe broken"}',
        b'{"text": "unterminated',
        json.dumps({"other": "x"}).encode(),
        json.dumps({"text": 5}).encode(),
        json.dumps({"text": "   "}).encode(),
        b'{"text": "lone \\ud800 surrogate"}',
        json.dumps([1, 2]).encode(),
        json.dumps({"text": "很长" * 50}, ensure_ascii=False).encode(),
        json.dumps({"text": "也好"}, ensure_ascii=False).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    reader = RecordReader(max_chars=60)
    docs = [d.text for d in reader.read(resolve_inputs([str(p)])[0])]
    assert docs == ["好", "也好"]
    assert reader.skipped.as_dict() == {
        "invalid_utf8": 2, "malformed_json": 2, "missing_field": 2, "empty": 1, "too_long": 1,
    }


@pytest.mark.parametrize(
    "content,line,what",
    [
        (b'{"text": "ok"}\n{"text": "\xff"}\n', 2, "invalid UTF-8"),
        (b'{"text": "ok"}\n{"text": \n', 2, "malformed JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', 2, "text field 'text' missing"),
    ],
)
def test_strict_names_file_and_line(tmp_path, content, line, what):
    p = tmp_path / "c.jsonl"
    p.write_bytes(content)
    with pytest.raises(UserError) as exc:
        list(RecordReader(strict=True).read(resolve_inputs([str(p)])[0]))
    assert f"{p}:{line}" in str(exc.value) and what in str(exc.value)


def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_inputs([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported corpus file type"):
        resolve_inputs([str(tmp_path / "x.csv")])
    with pytest.raises(UserError, match="holds no"):
        resolve_inputs([str(tmp_path)])
    with pytest.raises(UserError, match="no corpus"):
        resolve_inputs([])


def test_corrupt_gzip_is_named(tmp_path):
    p = tmp_path / "c.txt.gz"
    p.write_bytes(gzip.compress(("好\n" * 1000).encode())[:-30])
    with pytest.raises(UserError, match="corrupt or truncated"):
        list(RecordReader().read(resolve_inputs([str(p)])[0]))


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "e.parquet")
    with pytest.raises(UserError, match="no column 'text'"):
        read_all([tmp_path / "e.parquet"])


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_byte_ranges_tile_a_file(tmp_path, fmt, zh_docs):
    """Any cut of a file into byte ranges reads every record exactly once, in order."""
    p = tmp_path / f"c.{fmt}"
    if fmt == "txt":
        p.write_text("".join(d.replace("\n", " ") + "\n" for d in zh_docs), encoding="utf-8")
    else:
        write_jsonl(p, [{"text": d} for d in zh_docs])
    src = resolve_inputs([str(p)])[0]
    whole = [(d.offset, d.text) for d in RecordReader().read(src)]
    rng = random.Random(0)
    for parts in (2, 3, 7, 50):
        cuts = sorted({0, src.size, *(rng.randrange(1, src.size) for _ in range(parts - 1))})
        got = []
        for a, b in zip(cuts, cuts[1:]):
            got += [(d.offset, d.text) for d in RecordReader().read(src, a, b)]
        assert got == whole
    # A cut exactly at a line start belongs to the next range.
    second = whole[1][0]
    first = [d.text for d in RecordReader().read(src, 0, second)]
    assert len(first) == 1


# ------------------------------------------------------------------------------ what a folder may hold


def _resolve_with_alarm(patterns, seconds=10):
    """resolve_inputs and a full read, failing (instead of hanging the suite) if anything blocks."""
    import signal

    def boom(*_):
        raise TimeoutError("blocked: a special file was opened")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        sources = resolve_inputs([str(p) for p in patterns])
        reader = RecordReader()
        return sources, [d.text for s in sources for d in reader.read(s)]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_special_files_in_a_folder_are_skipped_and_counted_never_opened(tmp_path, capsys):
    import os
    import socket

    (tmp_path / "a.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    os.mkfifo(tmp_path / "pipe.jsonl")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.txt"))
    try:
        sources, docs = _resolve_with_alarm([tmp_path], seconds=5)
    finally:
        sock.close()
    assert docs == DOCS
    assert [s.path for s in sources] == [str(tmp_path / "a.txt")]
    assert sources.skipped["special"] == [str(tmp_path / "pipe.jsonl"), str(tmp_path / "s.txt")]
    assert "skipped 2 special files (FIFO, socket or device)" in capsys.readouterr().err


def test_a_fifo_named_directly_is_refused(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(UserError, match=r"pipe.jsonl is a FIFO \(named pipe\), not a regular file"):
        _resolve_with_alarm([tmp_path / "pipe.jsonl"], seconds=5)


def test_dangling_symlinks_are_skipped_in_folders_and_named_when_given(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "missing.jsonl")
    sources, docs = _resolve_with_alarm([tmp_path])
    assert docs == DOCS and sources.skipped["dangling"] == [str(tmp_path / "gone.jsonl")]
    assert "skipped 1 dangling symlink" in capsys.readouterr().err
    with pytest.raises(UserError, match=rf"gone.jsonl is a symlink to {tmp_path / 'missing.jsonl'}, which does not exist"):
        resolve_inputs([str(tmp_path / "gone.jsonl")])


def test_a_file_reached_twice_through_symlinks_is_read_once(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "up").symlink_to(tmp_path)  # a loop back to the top: followed once, never forever
    sources, docs = _resolve_with_alarm([tmp_path, tmp_path / "b.txt", str(tmp_path / "*.txt")])
    assert docs == DOCS
    assert [s.path for s in sources] == [str(tmp_path / "a.txt")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("links", [{"a": ".", "b": "."}, {"a": "b", "b": "a"}, {"sub/up": "..", "sub/down": "../sub"}])
def test_a_recursive_glob_over_self_referencing_symlinks_returns(tmp_path, links):
    """Two links back into the folder made glob's ``**`` double the tree at every level (it never returned); a
    pair of links to each other is a loop that is no folder at all. Either way the glob reads the corpus once."""
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    for name, target in links.items():
        (corpus / name).symlink_to(target)
    pattern = str(corpus / "**" / "*.jsonl")
    assert [s.path for s in resolve_inputs([pattern])] == [str(corpus / "a.jsonl")]
    assert _resolve_with_alarm([pattern], seconds=30)[1] == DOCS
    assert [s.path for s in resolve_inputs([str(corpus)])] == [str(corpus / "a.jsonl")]  # the folder form agrees


def test_a_linked_folder_inside_a_corpus_folder_is_read(tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "x.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "wiki").symlink_to(other)
    assert _resolve_with_alarm([corpus])[1] == DOCS


def _unprivileged(fn, *args) -> str:
    """fn(*args) in a forked child that has dropped root (root reads every file whatever its mode); returns
    what it returned, as a string."""
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            out = str(fn(*args))
        except BaseException as exc:  # noqa: BLE001  (reported to the parent)
            out = f"{type(exc).__name__}: {exc}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read().decode()
    os.waitpid(pid, 0)
    return got


def _read_error(target: str) -> str:
    try:
        [list(RecordReader().read(s)) for s in resolve_inputs([target])]
    except UserError as exc:
        return str(exc)
    return "no error"


def test_an_unreadable_file_says_permission_denied():
    import os
    import shutil
    import tempfile

    d = tempfile.mkdtemp()
    p = os.path.join(d, "secret.jsonl")
    try:
        os.chmod(d, 0o755)
        with open(p, "w") as f:
            f.write('{"text": "x"}\n')
        os.chmod(p, 0o000)
        for target in (p, d):
            got = _unprivileged(_read_error, target)
            assert f"cannot read {p}: permission denied" in got, got
    finally:
        shutil.rmtree(d)


def test_a_file_that_changes_while_it_is_read_is_an_error(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("".join(f"文档{i}\n" for i in range(20000)), encoding="utf-8")
    src = resolve_inputs([str(p)])[0]
    reader = RecordReader()
    it = reader.read(src)
    next(it)
    with open(p, "r+b") as f:  # shrink it mid-read, as a second job rewriting it would
        f.truncate(src.size // 2)
    with pytest.raises(UserError, match=rf"{p}: changed while being read \(size {src.size:,} -> {src.size // 2:,} bytes"):
        list(it)
    # A byte range read after the change is refused before it yields anything.
    with pytest.raises(UserError, match="changed while being read"):
        list(RecordReader().read(src, src.size // 2, src.size))
    # Parquet and compressed files too.
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "e.parquet")
    (tmp_path / "g.txt.gz").write_bytes(gzip.compress(("\n".join(DOCS) + "\n").encode()))
    for name in ("e.parquet", "g.txt.gz"):
        s = resolve_inputs([str(tmp_path / name)])[0]
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes() + b"\0")
        with pytest.raises(UserError, match=f"{name}: changed while being read"):
            list(RecordReader().read(s))
