"""The shard formats: names, constants, Arrow schemas and the checks that a file holds what a manifest says.

Pre-training shards (FORMAT, FORMAT_V1): one row per training sequence, ``input_ids`` a fixed-size list of exactly
``block_size`` token ids in the smallest unsigned type that holds the vocabulary (uint16 up to 65,536 pieces),
optionally ``doc_starts`` (offsets inside the sequence where a document begins) and, from /2, ``n_chars`` /
``n_bytes`` (the text each sequence came from). Instruction-tuning shards (SFT_FORMAT): see below.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa

from ... import files
from ...errors import UserError

MANIFEST = "manifest.json"
# /2 added the n_chars / n_bytes columns (the text each sequence came from: bits per character); /1 shards still
# train and evaluate, without bits per character.
FORMAT = "cllama-shards/2"
FORMAT_V1 = "cllama-shards/1"
PRETRAIN_FORMATS = (FORMAT, FORMAT_V1)
SIZE_COLUMNS = ["n_chars", "n_bytes"]
SFT_FORMAT = "cllama-sft-shards/1"  # instruction tuning: see "Instruction-tuning shards" below
SFT_COLUMNS = ["input_ids", "loss_mask", "example_starts", "n_tokens"]
ROWS_PER_BATCH = 1024  # fixed, so that files are byte-identical however the stream arrived


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def schema(block_size: int, dtype: np.dtype, boundaries: bool, sizes: bool = False) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(pa.from_numpy_dtype(dtype), block_size), nullable=False)]
    if boundaries:
        fields.append(pa.field("doc_starts", pa.list_(pa.int32()), nullable=False))
    if sizes:  # fixed width, so every full record batch keeps one message length (MappedShard._predict)
        fields += [pa.field(name, pa.int64(), nullable=False) for name in SIZE_COLUMNS]
    return pa.schema(fields)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_schema(path: str | os.PathLike, sch: pa.Schema, block_size: int | None = None,
                 dtype: np.dtype | str | None = None, columns: list[str] | None = None) -> tuple[int, np.dtype]:
    """Refuse a shard whose Arrow schema is not what the manifest says; returns (block size, dtype) it holds.

    Checked here, by name, so that a manifest that does not belong to its shards (copied from another run, a
    hand edit) is an error naming the shard instead of a numpy broadcast error deep in the loader.
    """
    if "input_ids" not in sch.names:
        raise UserError(f"shard {path} has no input_ids column (columns: {', '.join(sch.names)}): not a cllama shard")
    t = sch.field("input_ids").type
    if not pa.types.is_fixed_size_list(t):
        raise UserError(f"shard {path}: input_ids is {t}, not a fixed-size list of token ids: not a cllama shard")
    held_dtype = np.dtype(t.value_type.to_pandas_dtype())
    problems = []
    if block_size is not None and t.list_size != int(block_size):
        problems.append(f"its sequences hold {t.list_size} tokens, the manifest's block_size is {block_size}")
    if dtype is not None and held_dtype != np.dtype(dtype):
        problems.append(f"its token ids are {held_dtype.name}, the manifest's dtype is {np.dtype(dtype).name}")
    if columns is not None and list(sch.names) != list(columns):
        problems.append(f"its columns are {list(sch.names)}, the manifest's are {list(columns)}")
    if problems:
        raise UserError(f"shard {path}: " + "; ".join(problems)
                        + " (the manifest does not describe this shard: re-run `cllama preprocess`)")
    return t.list_size, held_dtype


def arrow_failure(path: str | os.PathLike, exc: Exception) -> UserError:
    if isinstance(exc, OSError) and exc.errno is not None:
        return files.os_error(exc, path, "read")
    return UserError(f"shard {path} is not a readable Arrow stream, it is corrupt or truncated ({exc})")


# ------------------------------------------------------------------------------ instruction-tuning shards
#
# Format SFT_FORMAT ("cllama-sft-shards/1", written by data/sft.py). Arrow IPC stream files like the pre-training
# shards, ROWS_PER_BATCH rows per record batch, one row per block of ``block_size`` tokens:
#   input_ids       fixed_size_list<uint16 | uint32, block_size>  the tokens, then pad_id up to block_size
#   loss_mask       fixed_size_list<uint8, block_size>            1 on response tokens and their EOS, else 0
#   example_starts  list<int32>                                   offset of each example in the row: [0, ...]
#   n_tokens        int32                                         real tokens; [n_tokens, block_size) is padding
# Row invariants (verify_shards checks every one): ids < vocabulary, loss_mask in {0, 1} and 0 on padding,
# example_starts non-empty, starting at 0, strictly increasing, below n_tokens, 1 <= n_tokens <= block_size;
# in the padded layout exactly one example per row.


def sft_schema(block_size: int, dtype: np.dtype) -> pa.Schema:
    return pa.schema([
        pa.field("input_ids", pa.list_(pa.from_numpy_dtype(dtype), block_size), nullable=False),
        pa.field("loss_mask", pa.list_(pa.uint8(), block_size), nullable=False),
        pa.field("example_starts", pa.list_(pa.int32()), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
    ])


def check_sft_schema(path: str | os.PathLike, sch: pa.Schema, block_size: int | None = None,
                     dtype: np.dtype | str | None = None, columns: list[str] | None = None) -> tuple[int, np.dtype]:
    """``check_schema`` for an instruction-tuning shard: input_ids as there, and the other three columns of
    SFT_COLUMNS with their exact types."""
    missing = [c for c in SFT_COLUMNS if c not in sch.names]
    if missing:
        raise UserError(f"shard {path} has no {', '.join(missing)} column (columns: {', '.join(sch.names)}): not an "
                        "instruction-tuning shard (`cllama preprocess-sft` writes them)")
    block, held = check_schema(path, sch, block_size, dtype, columns)
    want = sft_schema(block, held)
    for name in SFT_COLUMNS[1:]:
        if not sch.field(name).type.equals(want.field(name).type):
            raise UserError(f"shard {path}: column {name} is {sch.field(name).type}, expected {want.field(name).type}: "
                            "not written by cllama")
    return block, held
