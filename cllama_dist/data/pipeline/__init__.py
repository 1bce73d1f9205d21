"""The offline preprocessing machinery both kinds of shards share: inputs into packed, sharded Arrow files, in
parallel, in Slurm array tasks, resumable.

A kind (kind.py: ``Kind``; data/preprocess.py makes pre-training shards, data/sft.py instruction-tuning shards) says
what it reads, how a chunk is encoded (with its own tokenizer) and how a group's shards and the manifest are written.
What the machinery guarantees for every kind:

- **Chunks** (plan.py): plain .txt/.jsonl files are cut into byte ranges of ``chunk_mb`` (a record belongs to the
  range holding its first byte); Parquet files into runs of row groups; a compressed file or a JSON array is one
  chunk, streamed. A worker encodes one chunk at a time into spill files (folder.py: ``.tmp/``), so its memory
  never depends on the chunk or corpus size.
- **Groups**: consecutive chunks whose estimated output reaches ``shard_size_mb`` form a group; each group becomes
  one train shard and one validation shard.
- **Tasks** take contiguous runs of groups. The plan (chunks and groups) is computed from the inputs and settings
  alone, so 1 or 8 workers, 1 or 3 tasks, give byte-identical shards.
- **Resume** (run.py): shards are written under ``.tmp`` names, synced and renamed when complete; the group's
  record, written last (atomically), is the commit point. Re-running the same command skips committed groups
  (whose shards still have their recorded sizes) and redoes the rest: nothing is duplicated, nothing lost. A failure
  (a full disk) removes the partial files of uncommitted groups and keeps the rest.
- **Inputs**: the plan records each input's real path, size, modification time and a content sample; a resume over
  changed inputs is refused naming the file (``--overwrite`` redoes it), and a file that changes while it is read is
  an error. The output may not be, hold or lie inside an input, and ``--overwrite`` replaces only a folder this
  project made (``files.check_not_input``, ``claim_folder``; docs/hazards.md#h14).
- **Writers** (folder.py, docs/hazards.md#h15): one per output; each refusal names the holder.
- **Finalize**: after every task, under its own lock, the kind's manifest from every group's record, checked
  against the shards, then manifest.json.

This package must not import torch: it runs on CPU nodes and must start fast.
"""

from .folder import GROUPS, PLAN, SPILL, read_json, shard_path, write_json
from .kind import ChunkEncoder, ConfigT, GroupWriter, Kind, RunConfig, Work
from .plan import SPLITS, input_identity, make_plan, plan_chunks, plan_groups, resolve_task, split_of, task_groups
from .run import finalize, prepare, preprocess, run_task, spill_write

__all__ = ["GROUPS", "PLAN", "SPILL", "read_json", "shard_path", "write_json", "ChunkEncoder", "ConfigT",
           "GroupWriter", "Kind", "RunConfig", "Work", "SPLITS", "input_identity", "make_plan", "plan_chunks",
           "plan_groups", "resolve_task", "split_of", "task_groups", "finalize", "prepare", "preprocess", "run_task",
           "spill_write"]
