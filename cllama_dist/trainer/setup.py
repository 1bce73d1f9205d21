"""The run resolved before anything is built: ``resolve`` returns a frozen ``RunSpec``, from which the Trainer
(loop.py) builds the model, the engine and the metrics.

    lock, notes = claim(cfg, run_dir)                        # rank 0: the run folder is ours alone
    spec = resolve(cfg, device, Checkpointer(run_dir, ...), notes)

In order: the starting model (model.adapter merged once), the inputs (model config, tokenizer, manifests),
the shards verified, the data order, plan and schedule, the checkpoint to resume (damaged newer ones set
aside), the DeepSpeed engine's choices, the base model's fingerprint, the run's identity checked against the
checkpoint's. Everything that can be refused is refused here, before a weight is loaded. Each step that can
fail on one rank alone runs under an agreement (distributed.agree / on_main): a failure on any rank stops
every rank at once with its message, instead of leaving the others in the next collective until its timeout.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..data.shards import SFT_FORMAT
from ..errors import UserError
from ..files import LOCK, Lock, check_not_input, claim_folder
from ..model.config import resolve_dtype
from ..model.identity import base_fingerprint
from . import engine as engines
from . import mixture
from .checkpoint import Checkpointer, read_state
from .config import TrainConfig
from .engine import EngineChoice
from .plan import Plan
from .stages import Schedule
from .state import RunIdentity
from .validate import Validators

STOP_FILE = "STOP"  # touched by slurm/pretrain.sh (or a user) to ask every rank to save and stop
START_MODEL = "start-model"  # model.path + model.adapter, merged (model.adapter)


@dataclass(frozen=True)
class Inputs:
    """What the run reads: the base model's config, the merged tokenizer, the shard sets (manifests checked
    against both) and what their manifests decide."""

    llama: Any            # the base model's LlamaConfig
    vocab: Any            # tokenizer/merged.py's MergedVocab
    sets: tuple           # trainer/mixture.py's ShardSet, one per folder
    single: bool          # one folder (data.path): the order and records it always had
    block: int
    document_mask: bool   # data.document_mask, in effect (pre-training blocks only)
    verified: dict = field(default_factory=dict)  # what the shard verification did on this rank

    @property
    def manifest(self) -> dict:
        return self.sets[0].manifest

    @property
    def sft(self) -> bool:
        """Instruction-tuning rows rather than pre-training blocks: the manifests' format decides."""
        return self.manifest.get("format") == SFT_FORMAT

    @property
    def rows_kept_apart(self) -> bool:
        """Micro-batch rows hold several examples or documents that must not attend to each other."""
        return (self.sft and self.manifest.get("layout") == "packed") or self.document_mask


@dataclass(frozen=True)
class Data:
    """The train split in its order (what the loop reads: ``train.rows(order.indices(positions))``) and the
    validation splits."""

    train: Any
    order: Any
    validation: Validators


@dataclass(frozen=True)
class ResumePoint:
    """Where the run starts: a checkpoint and its saved state, or nothing (step 0)."""

    path: Path | None = None
    state: dict | None = None
    universal: bool = False  # saved by another number of processes: loaded through DeepSpeed's universal format
    schedule_change: dict = field(default_factory=dict)  # {setting: {was, now}}, allowed on purpose

    @property
    def step(self) -> int:
        return self.state["step"] if self.state else 0


@dataclass(frozen=True)
class RunSpec:
    """A training run, resolved: everything the Trainer builds from, decided once."""

    cfg: TrainConfig  # as the run uses it (model.path: the merged starting model when model.adapter is set)
    run_dir: Path
    device: str
    inputs: Inputs
    data: Data
    plan: Plan
    schedule: Schedule  # a plain run: one stage (trainer/stages.py)
    engine: EngineChoice
    resume: ResumePoint
    identity: RunIdentity  # saved in every checkpoint, checked on resume
    notes: tuple[str, ...] = ()
    new_row_init: str = "mean"  # model.new_row_init resolved (auto: subword where the base tokenizer is readable)


def run_folder(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir or "runs/train")


def claim(cfg: TrainConfig, run_dir: Path) -> tuple[Lock | None, list[str]]:
    """Rank 0: the run folder may not touch an input; it is ours (marked) and ours alone (locked). Returns the
    lock (rank 0's; None on the others) and the notes to print."""
    held: list[Lock] = []

    def run() -> list[str]:
        m = cfg.model
        shards = {f"shards{'' if not cfg.data.sets else ' of set ' + s.name}": s.path for s in cfg.data.mixture()}
        check_not_input(run_dir, {"base model": m.path, "tokenizer": m.tokenizer, **shards}, "training run")
        claim_folder(run_dir, "run", reuse=True)
        lock = Lock(run_dir / LOCK, "training run").acquire()
        held.append(lock)
        note = lock.describe_takeover()
        (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier attempt
        return [note] if note else []

    try:
        notes = dist.on_main("checking the run folder", run)
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return (held[0] if held else None), notes


def resolve(cfg: TrainConfig, device: str, checkpointer: Checkpointer, notes: list[str] = ()) -> RunSpec:
    """The run as it will go (every rank calls this; the steps are in the module's docstring)."""
    notes = list(notes)
    run_dir = checkpointer.run_dir
    if cfg.model.adapter:
        notes += dist.on_main("merging the starting adapter into its base", lambda: merge_start_model(cfg, run_dir))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(run_dir / START_MODEL)))
    inputs = dist.agree("reading the tokenizer and the shards", lambda: read_inputs(cfg))
    # Every shard checked against the manifest (size, sha256, schema, ids below the vocabulary) before any step:
    # each rank checks its share, and a record in the run folder lets a resume skip unchanged shards.
    verified = dist.agree("verifying the shards", lambda: mixture.verify(
        inputs.sets, inputs.vocab.new_vocab, run_dir, dist.rank(), dist.world_size(), inputs.single))
    inputs = dataclasses.replace(inputs, verified=verified)
    data, plan, schedule = dist.agree("planning the run", lambda: plan_run(cfg, inputs))
    notes += data.validation.notes

    found = dist.on_main("choosing the checkpoint", lambda: choose_start(checkpointer))
    notes += found["notes"]
    state = found["state"]
    cuda = device.startswith("cuda")
    dtype = resolve_dtype(cfg.engine.dtype, cuda)
    universal = bool(state) and state["world_size"] != plan.world

    def free_bytes() -> int:
        import torch

        return int(dist.minimum(torch.cuda.mem_get_info()[0]))

    engine = engines.choose(cfg, plan, dtype, universal, max(1, plan.world // dist.local_world_size()), cuda,
                            lambda: model_sizes(cfg, inputs.vocab.new_vocab, dtype), free_bytes,
                            state.get("zero_stage") if state else None)
    base_model = dist.on_main("fingerprinting the base model", lambda: base_fingerprint(cfg.model, cfg.seed))
    identity = RunIdentity(
        global_batch=plan.global_batch, tokenizer=inputs.vocab.fingerprint, embeddings=cfg.model.embeddings,
        block_size=plan.block, zero_stage=engine.zero_stage, base_model=base_model,
        mixture=mixture.identity(inputs.sets, data.order, inputs.single), document_mask=inputs.document_mask,
        shards=mixture.content_identity(inputs.sets), schedule=schedule.record(),
        tied=bool(getattr(inputs.llama, "tie_word_embeddings", False)), rows=vocab_rows(inputs))
    resume = ResumePoint()
    if state:
        path = Path(found["path"])
        identity.check(path, state)
        change = identity.schedule_change(path, state, cfg.checkpoint.allow_schedule_change)
        if change:
            text = ", ".join(f"{k} {v['was']} -> {v['now']}" for k, v in change.items())
            notes.append(f"note: schedule changed on purpose at step {state['step']}: {text}")
        resume = ResumePoint(path, state, universal, change)
    init = cfg.model.new_row_init
    if init == "auto":
        from ..tokenizer.merged import base_available

        # From the pieces for a byte-level BPE extension whose base tokenizer is readable; a SentencePiece
        # extension keeps the mean its runs (and their recorded losses) always had unless subword is asked for.
        bpe = inputs.vocab.fingerprint.get("backend") == "bpe"
        init = "subword" if bpe and base_available(inputs.vocab) else "mean"
    return RunSpec(cfg, run_dir, device, inputs, data, plan, schedule, engine, resume, identity, tuple(notes), init)


def vocab_rows(inputs: Inputs) -> dict:
    """The three numbers that are not one (DESIGN B7): the base model's rows, the base tokenizer's
    length, the extended tokenizer's length; and the rows the trained model has (padding rows reused first)."""
    base_rows, v = inputs.llama.vocab_size, inputs.vocab
    return {"base_rows": base_rows, "base_tokens": v.orig_vocab, "tokens": v.new_vocab,
            "rows": max(base_rows, v.new_vocab), "padded_rows": "reuse"}


def merge_start_model(cfg: TrainConfig, run_dir: Path) -> list[str]:
    """Rank 0: model.path + model.adapter merged once into RUN/start-model, the model this run trains on (a
    folder already merged from the same base and adapter is reused, so a resume trains on the same weights)."""
    from ..export.run import export_merged

    m, target = cfg.model, run_dir / START_MODEL
    record = target / "cllama_export.json"
    if record.is_file() and (target / "config.json").is_file():
        done = json.loads(record.read_text())
        if done.get("base") == str(m.path) and done.get("adapter") == str(m.adapter):
            return [f"note: starting from {target} ({m.path} + {m.adapter}, merged earlier)"]
    export_merged(m.path, m.adapter, target, overwrite=True)
    return [f"note: starting from {m.path} + adapter {m.adapter}, merged into {target}"]


def read_inputs(cfg: TrainConfig) -> Inputs:
    """The base model's config, the merged tokenizer, and every set's manifest checked against both."""
    from ..model.adapters import load_llama_config
    from ..tokenizer.merged import read_merged

    llama = load_llama_config(cfg.model)
    vocab = read_merged(cfg.model.tokenizer, llama.vocab_size, cfg.model.extended_vocab)
    sets, block = mixture.read_sets(cfg.data, vocab.fingerprint)
    if block > llama.max_position_embeddings:
        raise UserError(f"block size {block} exceeds the model's max_position_embeddings "
                        f"{llama.max_position_embeddings}")
    sft = sets[0].manifest.get("format") == SFT_FORMAT
    return Inputs(llama, vocab, tuple(sets), not cfg.data.sets, block, bool(cfg.data.document_mask and not sft))


def plan_run(cfg: TrainConfig, inputs: Inputs) -> tuple[Data, Plan, Schedule]:
    """The data in its order, the batch arithmetic, and the learning-rate schedule (its stages' steps are the
    run's; without stages, one stage over optim.max_steps or one pass over the data)."""
    sets = list(inputs.sets)
    train, order = mixture.train_data(sets, cfg.seed, inputs.single)
    validation = Validators(sets, cfg.data.micro_batch_size, cfg.validation.sequences, inputs.single)
    steps = sum(s.steps for s in cfg.stages) or cfg.optim.max_steps
    plan = Plan.make(cfg.data, steps, dist.world_size(), inputs.block, len(train), None if inputs.single else order)
    return Data(train, order, validation), plan, Schedule(cfg.stages, cfg.optim, plan.max_steps)


def choose_start(checkpointer: Checkpointer) -> dict:
    """Rank 0: the checkpoint to resume (the newest valid one; damaged newer ones set aside) and its state, or a
    fresh start."""
    path = checkpointer.find_resume()
    notes = list(checkpointer.notes) + checkpointer.set_aside()
    if path is None:
        notes += set_aside_history(checkpointer.run_dir)
    return {"path": str(path) if path else None, "state": read_state(path) if path else None, "notes": notes}


def set_aside_history(run_dir: Path) -> list[str]:
    """A fresh start in a folder holding an earlier attempt's metrics (killed before its first checkpoint):
    those records would interleave with this run's, so they are moved aside, never deleted."""
    old = [p for p in (run_dir / "metrics.jsonl", run_dir / "tb") if p.exists()]
    if not old:
        return []
    aside = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    aside.mkdir(parents=True, exist_ok=True)
    for p in old:
        p.rename(aside / p.name)
    return [f"note: no checkpoint to resume; the earlier attempt's {', '.join(p.name for p in old)} moved to {aside}"]


def model_sizes(cfg: TrainConfig, new_vocab: int, dtype: str) -> tuple[int, int, int]:
    """(parameters, trainable, bytes per weight) of the model about to be built, counted on the meta device."""
    from ..model.adapters import DTYPES, dry_run

    counts = dry_run(cfg.model, cfg.lora, new_vocab)[cfg.model.embeddings]
    return counts.total, counts.trainable, DTYPES[dtype].itemsize
