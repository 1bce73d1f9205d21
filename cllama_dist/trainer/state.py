"""What a checkpoint records besides DeepSpeed's tensors (``TrainerState``, trainer_state.json), and the run's
identity (``RunIdentity``): what must not change between a checkpoint and the run that resumes it.

The identity is written once: it fills the saved state's fields (``record``) and is compared with a saved
state field by field on resume (``check``). A checkpoint of an earlier version lacks the newer fields; those
are not compared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError


@dataclass
class TrainerState:
    """What a checkpoint carries besides DeepSpeed's tensors: where the run stands and what it was trained
    with (checked on resume, and read by export)."""

    step: int
    world_size: int
    global_batch: int
    samples_consumed: int
    tokenizer_sha256: str
    orig_vocab: int
    new_vocab: int
    embeddings: str
    block_size: int
    zero_stage: int
    reason: str
    base_model: dict = field(default_factory=dict)  # model/identity.py's fingerprint of the frozen base
    schedule: dict = field(default_factory=dict)    # what shapes the learning-rate curve (checked on resume)
    mixture: list = field(default_factory=list)     # data.sets' names, weights, sizes ([]: one folder; checked)
    config: dict = field(default_factory=dict)
    time: float = 0.0
    # Instruction tuning: the chat template of the shards ({name, sha256, source}; export installs it), and the
    # vocabulary of the model the run started from (the extended one when it started from a merged model).
    template: dict | None = None
    base_vocab: int = 0
    # data.document_mask: a resume with it switched would change what every later step attends to and predicts.
    document_mask: bool = False
    stage: str = ""  # a staged schedule: the stage of the last step taken ("": none; trainer/stages.py)
    # Per shard folder, the digest of its train shards' sha256 list (trainer/mixture.py content_identity):
    # the data order is positions in these shards, so other shards at the same offset are other data.
    shards: list = field(default_factory=list)
    # lm_head is embed_tokens (one matrix); and the vocabulary's numbers (setup.vocab_rows): base_rows, base_tokens,
    # tokens, rows, padded_rows. orig_vocab / new_vocab above are base_tokens / tokens.
    tied: bool = False
    rows: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainerState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class RunIdentity:
    """What must not change between a checkpoint and the run that resumes it, in the order it is checked.

    Each field is saved under its own name in trainer_state.json, but ``tokenizer`` (the tokenizer's
    fingerprint; its sha256 is saved as ``tokenizer_sha256``). ``schedule`` is checked apart: a change of it
    may be allowed on purpose (checkpoint.allow_schedule_change)."""

    global_batch: int
    tokenizer: dict  # tokenizer/spm.py's fingerprint: {"sha256", "file_sha256", ...}
    embeddings: str
    block_size: int
    zero_stage: int
    base_model: dict
    mixture: list
    document_mask: bool
    shards: list
    schedule: dict
    tied: bool = False
    rows: dict = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The identity as TrainerState's fields."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tokenizer"}
        return {"tokenizer_sha256": self.tokenizer["sha256"], **out}

    def check(self, path: Path, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose recorded identity differs from this run's, naming the setting."""
        if "tied" in state and state["tied"] != self.tied:
            # First: a tied model is another base too, and the base fingerprint's message would hide why.
            def kind(t: bool) -> str:
                return "tied embeddings (lm_head = embed_tokens, one matrix)" if t else "untied embeddings"

            raise UserError(f"cannot resume {path}: it was trained on a model with {kind(state['tied'])}, this run's "
                            f"model has {kind(self.tied)}: resume on the model it was trained on")
        for f in dataclasses.fields(self):
            key = "tokenizer_sha256" if f.name == "tokenizer" else f.name
            if key in ("zero_stage", "schedule") or key not in state:  # older checkpoints lack newer keys
                continue
            value = getattr(self, f.name)
            if key == "tokenizer_sha256":
                from ..tokenizer.spm import same_tokenizer

                if not same_tokenizer(state[key], value):
                    raise UserError(f"cannot resume {path}: it was trained with the tokenizer {state[key][:16]}..., "
                                    f"this run's is {value['sha256'][:16]}...")
            elif key == "base_model":
                if state[key].get("sha256") != value.get("sha256"):
                    raise UserError(f"cannot resume {path}: it was trained on the base {state[key].get('source')} "
                                    f"(fingerprint {state[key].get('sha256', '')[:12]}), this run's base is "
                                    f"{value.get('source')} (fingerprint {value.get('sha256', '')[:12]})")
            elif key == "shards":
                _check_shards(path, state[key], value)
            elif state.get(key) != value:
                raise UserError(f"cannot resume {path}: its {key} is {state.get(key)!r}, this run's is {value!r}")
        stage, saved = self.zero_stage, state.get("zero_stage")
        if saved is not None and (saved == 3) != (stage == 3):
            # DeepSpeed lays out ZeRO-3 checkpoints differently from ZeRO-1/2 (one optimizer class, the same
            # files, read across the two: tests/integration/test_frozen_base.py); its loaders read only their own.
            # engine.frozen_base picks the stage of a ZeRO-3 config (resident = ZeRO-1, or ZeRO-2 in runs saved
            # before): both choices are named.
            def named(s: int) -> str:
                return f"ZeRO-{s} (engine.frozen_base: {'partitioned' if s == 3 else 'resident'})"

            raise UserError(f"cannot resume {path}: it was saved under {named(saved)}, this run is "
                            f"{named(stage)}; DeepSpeed's loaders read only their own stage's layout: keep the "
                            "run's DeepSpeed config and frozen_base")

    def schedule_change(self, path: Path, state: dict[str, Any], allowed: bool) -> dict[str, dict]:
        """The settings of the learning-rate curve that differ from the checkpoint's, as {key: {was, now}}
        ({} when none); refused unless ``allowed`` (checkpoint.allow_schedule_change)."""
        theirs = state.get("schedule")
        if theirs is None:
            return {}
        # A checkpoint from before staged schedules had no stages: adding stages is a change.
        theirs = {"stages": [], **theirs}
        changed = {k: (theirs[k], v) for k, v in self.schedule.items() if theirs and k in theirs and theirs[k] != v}
        if not changed:
            return {}
        text = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        if not allowed:
            raise UserError(f"cannot resume {path}: the schedule would change ({text}), reshaping the "
                            "learning-rate curve mid-run; keep the run's settings, or set "
                            "checkpoint.allow_schedule_change: true to change it on purpose (it is recorded)")
        return {k: {"was": a, "now": b} for k, (a, b) in changed.items()}


def _check_shards(path: Path, saved: list, now: list) -> None:
    """The same data: each shard folder's train shards have the digest the checkpoint recorded (the folder may
    have moved; its content may not change)."""
    for theirs, mine in zip(saved, now):
        if theirs.get("sha256") != mine.get("sha256"):
            raise UserError(f"cannot resume {path}: it was trained on the shards of {theirs.get('path')} (train "
                            f"shards digest {str(theirs.get('sha256'))[:12]}), this run's shards in {mine['path']} "
                            f"differ (digest {mine['sha256'][:12]}): the resume would read other data at the same "
                            "sample offset; resume on the shards it was trained on, or train into another output_dir")
