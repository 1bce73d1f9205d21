"""Arrow shards and the manifest: the contract between the preprocessor and the trainer.

A shard is an Arrow IPC *stream* file (what ``datasets`` itself writes) with one row per training
sequence: ``input_ids``, a fixed-size list of exactly ``block_size`` token ids in the smallest unsigned
type that holds the vocabulary (uint16 up to 65,536 pieces), and optionally ``doc_starts``, the
offsets inside the sequence where a document begins. Read one with

    datasets.Dataset.from_file("out/train-00000.arrow")
    datasets.load_dataset("arrow", data_files={"train": "out/train-*.arrow"}, split="train")
    pyarrow.ipc.open_stream(pyarrow.memory_map("out/train-00000.arrow")).read_all()   # zero-copy

``manifest.json`` names the tokenizer fingerprint, block size, dtype, BOS/EOS policy and, per shard,
its file, sequences, tokens and sha256. The trainer calls ``check_manifest`` before building anything.

Instruction-tuning shards (``cllama preprocess-sft``, format SFT_FORMAT) are the second kind: the same stream
files with four columns (input_ids, loss_mask, example_starts, n_tokens), their own manifest format
(``load_sft_manifest``, ``check_sft_manifest``), read by ``MappedSFTShard`` / ``loader.SFTBlocks`` and verified by
the same ``verify_shards``.

The modules, by role:
  format    names, constants, dtypes, Arrow schemas and schema checks of both kinds (the SFT row invariants)
  write     ``ShardWriter`` / ``SFTShardWriter``: a temporary file, synced, hashed, renamed into place
  read      ``MappedShard`` / ``MappedBoundaryShard`` / ``MappedSFTShard`` (zero-copy views on a memory map, what
            the loaders are made of), ``read_shard``, ``shard_tokens`` (one array, a copy, for tools)
  manifest  ``load_manifest`` / ``check_manifest`` and their SFT forms, ``shard_list`` / ``shard_subsets``
  verify    ``verify_shards``: shards against the manifest, in full or by subsets that ranks can share
            (docs/hazards.md#h16)
Each public name is importable from here as well.
"""

from .format import (FORMAT, FORMAT_V1, MANIFEST, PRETRAIN_FORMATS, ROWS_PER_BATCH, SFT_COLUMNS, SFT_FORMAT,
                     SIZE_COLUMNS, arrow_failure, check_schema, check_sft_schema, dtype_for_vocab, schema,
                     sft_schema, sha256_file)
from .manifest import (check_manifest, check_sft_manifest, load_manifest, load_sft_manifest, shard_list,
                       shard_subsets)
from .read import MappedBoundaryShard, MappedSFTShard, MappedShard, buffer_at, read_shard, shard_tokens
from .verify import RECORD_FORMAT, verify_shards
from .write import SFTShardWriter, ShardWriter, StreamWriter

__all__ = ["FORMAT", "FORMAT_V1", "MANIFEST", "PRETRAIN_FORMATS", "ROWS_PER_BATCH", "SFT_COLUMNS", "SFT_FORMAT",
           "SIZE_COLUMNS", "arrow_failure", "check_schema", "check_sft_schema", "dtype_for_vocab", "schema",
           "sft_schema", "sha256_file", "check_manifest", "check_sft_manifest", "load_manifest", "load_sft_manifest",
           "shard_list", "shard_subsets", "MappedBoundaryShard", "MappedSFTShard", "MappedShard", "buffer_at",
           "read_shard", "shard_tokens", "RECORD_FORMAT", "verify_shards", "SFTShardWriter", "ShardWriter",
           "StreamWriter"]
