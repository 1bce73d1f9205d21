"""The plan of work: inputs cut into chunks, chunks into groups, groups into tasks, documents into splits.

Everything here is a function of the inputs and the settings alone, never of the workers or tasks, which is what
makes 1 or 8 workers, 1 or 3 tasks, give byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from ... import files
from ...errors import UserError
from ..corpus import Source, content_sample
from .kind import ConfigT

SPLITS = ("train", "validation")
COMPRESSION_ESTIMATE = 3.0  # decompressed bytes per compressed byte, for planning only

def make_plan(sources: list[Source], settings: dict, *, chunk_mb: float, shard_size_mb: float,
              output_per_input_byte: float, **extra) -> dict:
    """plan.json: the inputs' identities, the chunks, the groups and the kind's ``settings`` (everything that
    changes the bytes of the output), then ``extra`` (what else the kind keeps in its plan)."""
    chunks = plan_chunks(sources, chunk_mb)
    return {
        "inputs": [input_identity(s) for s in sources],
        "chunks": [c[:3] for c in chunks],
        "groups": plan_groups(chunks, shard_size_mb, output_per_input_byte),
        "settings": settings,
        **extra,
    }


def plan_chunks(sources: list[Source], chunk_mb: float) -> list[list]:
    """Each source cut into chunks ``[source index, start, end, estimated input bytes]``, from the sources alone.

    A splittable file (``Source.splittable``: plain .txt / .jsonl) is cut into byte ranges of ``chunk_mb``; an
    uncompressed Parquet file into runs of row groups; anything else (compressed, or a JSON array, whose Source
    format data/sft.py sets to "json") is one chunk (end None), read whole.
    """
    chunk_bytes = max(int(chunk_mb * 1e6), 1)
    chunks: list[list] = []
    for i, src in enumerate(sources):
        if src.splittable:
            for a in range(0, max(src.size, 1), chunk_bytes):
                chunks.append([i, a, min(a + chunk_bytes, src.size), min(chunk_bytes, src.size - a)])
        elif src.fmt == "parquet" and not src.compression:
            meta = _parquet_metadata(src)
            start, acc = 0, 0
            for g in range(meta.num_row_groups):
                acc += meta.row_group(g).total_byte_size
                if acc >= chunk_bytes or g == meta.num_row_groups - 1:
                    chunks.append([i, start, g + 1, acc])
                    start, acc = g + 1, 0
            if meta.num_row_groups == 0:
                chunks.append([i, 0, 0, 0])
        else:
            chunks.append([i, 0, None, int(src.size * (COMPRESSION_ESTIMATE if src.compression else 1))])
    return chunks


def plan_groups(chunks: list[list], shard_size_mb: float, output_per_input_byte: float) -> list[list[int]]:
    """Consecutive chunks whose estimated output (input bytes x ``output_per_input_byte``) reaches
    ``shard_size_mb`` form a group ``[first chunk, end chunk)``: one train and one validation shard."""
    target = shard_size_mb * 1e6
    groups: list[list[int]] = []
    first, est = 0, 0.0
    for c, chunk in enumerate(chunks):
        est += chunk[3] * output_per_input_byte
        if est >= target or c == len(chunks) - 1:
            groups.append([first, c + 1])
            first, est = c + 1, 0.0
    return groups


def input_identity(src: Source) -> dict:
    """What identifies an input file in the plan: its real path, size, modification time (ns) and a sample of its
    content. A resume compares them, so an edited corpus (even one of the same size) is never silently mixed
    with shards made from its earlier content."""
    return {"path": src.path, "real": src.real or os.path.realpath(src.path), "size": src.size,
            "mtime_ns": src.mtime_ns, "sample": content_sample(src.path, src.size), "format": src.fmt,
            "compression": src.compression}


def chunk_bytes(chunk: list, sources: list[Source]) -> int:
    """The input bytes a chunk reads, for progress (0 for row groups of Parquet: their size is not known)."""
    src = sources[chunk[0]]
    if src.splittable:
        return chunk[2] - chunk[1]
    return src.size if src.fmt != "parquet" or src.compression else 0


def _parquet_metadata(src: Source):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(src.path).metadata
    except OSError as exc:
        if exc.errno is not None:
            raise files.os_error(exc, src.path, "read") from None
        raise UserError(f"{src.path}: not a readable Parquet file ({exc})") from None
    except Exception as exc:
        raise UserError(f"{src.path}: not a readable Parquet file ({exc})") from None


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") and v.lstrip("-").isdigit() else default


def resolve_task(cfg: ConfigT) -> ConfigT:
    """num_tasks / task_id with Slurm's array variables as defaults (SLURM_ARRAY_TASK_COUNT, _ID - _MIN)."""
    num = cfg.num_tasks or _env_int("SLURM_ARRAY_TASK_COUNT", 1)
    task = cfg.task_id if cfg.task_id >= 0 else _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
    if not 0 <= task < num:
        raise UserError(f"task_id {task} is outside 0..{num - 1} (num_tasks {num})")
    return dataclasses.replace(cfg, num_tasks=num, task_id=task)  # type: ignore[type-var]


def task_groups(n_groups: int, num_tasks: int, task_id: int) -> range:
    """The contiguous run of groups that task ``task_id`` of ``num_tasks`` owns."""
    return range(task_id * n_groups // num_tasks, (task_id + 1) * n_groups // num_tasks)


def split_of(text: str, fraction: float, seed: int) -> int:
    """0 (train) or 1 (validation), from a keyed hash of the document's text."""
    if fraction <= 0:
        return 0
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int(int.from_bytes(h.digest(), "little") < fraction * 2**64)
