"""The seam between the preprocessing machinery and a kind of output it makes.

A kind (data/preprocess.py: pre-training shards; data/sft.py: instruction-tuning shards) says what it reads, how
one chunk of it is encoded and how a group's shards and the manifest are written. The machinery owns the rest:
the plan of chunks and groups, the tasks, the output folder with its locks and plan checks, the spill folder, the
commit of each group by its record, resume, the clean-up after a failure, finalize. The tokenizer is the kind's
(an ``encoder.Encoder`` that its ChunkEncoder carries to the workers): the machinery never sees one.

The calls, in order: ``Kind.plan`` once per run (in the main process); ``ChunkEncoder.start`` once per worker
process, then ``ChunkEncoder.encode`` per chunk (in the workers); per group, in group order and with the chunk
results in chunk order, ``Kind.group_writer`` -> ``add`` ... -> ``close`` (or ``abort``) in the main process;
at finalize, ``Kind.manifest`` over every group's record.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol, TypeVar

from ..corpus import Source


class RunConfig(Protocol):
    """What the machinery reads of a kind's config (PreprocessConfig, SFTPreprocessConfig: dataclasses)."""

    output: str
    overwrite: bool
    workers: int
    num_tasks: int
    task_id: int


ConfigT = TypeVar("ConfigT", bound=RunConfig)


class ChunkEncoder(Protocol):
    """Encodes chunks of the inputs into spill files. It runs in the worker processes: it must pickle (it is
    handed to each worker once) and load what it encodes with (the tokenizer) in ``start``, not before."""

    def start(self) -> None:
        """Once per worker process, before its first chunk."""

    def encode(self, index: int, chunk: list, spill: Path) -> dict:
        """Encode chunk ``index`` (``[source index, start, end]`` of the plan) into files named ``spill`` plus a
        suffix (the machinery removes ``chunk-<index>.*`` when the chunk's group is not committed) and return what
        the group writer needs of it, small (it is sent back to the main process)."""


class GroupWriter(Protocol):
    """One group's shards, written from its chunks' results in chunk order."""

    def add(self, chunk: int, result: dict) -> int:
        """Take chunk ``chunk``'s result (reading and deleting its spill files); returns its tokens, for progress."""

    def close(self) -> dict:
        """Finish the shards and return the group's record (the machinery puts "group" and "chunks" first):
        ``"shards"``, per split the shard's record (``ShardWriter.close``) or None, then whatever the kind's
        ``manifest`` needs. Writing the record commits the group."""

    def abort(self) -> None:
        """Remove the partial shards: an error is on its way."""


@dataclasses.dataclass
class Work:
    """What a kind planned for one run: its inputs (checked), the plan (``plan.make_plan``: what plan.json holds)
    and the encoder of its chunks."""

    sources: list[Source]
    plan: dict
    encoder: ChunkEncoder


class Kind(Protocol):
    """A kind of preprocessing output: what the machinery (run.py) asks of it."""

    folder_kind: str  # the output folder's kind (files.claim_folder): "shards", "sft-shards"
    command: str  # the command that makes it, for messages: "cllama preprocess"
    label: str  # what its locks and progress bar are called: "preprocess"

    def plan(self, cfg) -> Work:
        """Check every input (the tokenizer, the files, the output against them: ``files.check_not_input``) and
        plan the work, before anything is written."""

    def group_writer(self, out: Path, plan: dict, group: int) -> GroupWriter:
        """The writer of group ``group``'s shards (``folder.shard_path`` names them)."""

    def manifest(self, out: Path, plan: dict, records: list[dict]) -> dict:
        """manifest.json from the plan and every group's record, in group order. It may write shards of its own
        (the pre-training -tail shards); the machinery then verifies every shard it names and writes it."""
