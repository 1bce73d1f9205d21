"""Settings of ``cllama demo``."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PathStr, Section, check, option
from .base_model import BASE_PRETRAIN_STEPS

DEMO_STEPS = 60  # ~3.5 passes over the demo's 36K training tokens; more only overfits them
DEMO_SFT_STEPS = 60
# The stages of recipe.py, in order (tests/unit/test_demo.py checks its list against these); --replay's three
# come before eval.
STAGE_NAMES = ("corpus", "base", "tokenizer", "merge", "report", "shards", "model", "train", "export", "eval",
               "generate", "sft-shards", "sft-train", "sft-export", "sft-chat")
REPLAY_STAGE_NAMES = ("replay_shards", "train_replay", "export_replay")


@dataclass
class DemoConfig(Section):
    """The whole pipeline on the shipped corpus (CPU, tiny model)."""

    out: PathStr = option("runs/demo", "Folder for every artefact.")
    base_tokenizer: PathStr = option("", "A real base SentencePiece model (e.g. LLaMA's tokenizer.model); default: "
                                         "build one offline.")
    force: bool = option(False, "Redo every stage instead of reusing finished ones.")
    steps: int = option(DEMO_STEPS, "Training steps of the 2-process ZeRO-3 stage.")
    sft_steps: int = option(DEMO_SFT_STEPS, "Steps of the instruction-tuning stage (2-process ZeRO-3).")
    base_steps: int = option(BASE_PRETRAIN_STEPS, "Steps that train the demo's stand-in base model on English "
                                                  "(one process; fewer: a base that knows English less well).")
    until: str = option("", "Stop after this stage (see `cllama demo --help` for the list).")
    replay: float = option(
        0.0, "Also train the same model on a mixture in which this share of the sequences replays the base's English "
             "text (data.sets), and show its Chinese and English bits per character beside the run without (0: off; "
             "about the training stage's time again).")

    def validate(self) -> None:
        check(self.steps >= 1, "steps", f"must be at least 1, got {self.steps}")
        check(self.sft_steps >= 1, "sft_steps", f"must be at least 1, got {self.sft_steps}")
        check(self.base_steps >= 1, "base_steps", f"must be at least 1, got {self.base_steps}")
        names = STAGE_NAMES + (REPLAY_STAGE_NAMES if self.replay else ())
        check(not self.until or self.until in names, "until",
              f"{self.until!r}: not a stage; the stages are {', '.join(names)}")
        check(0 <= self.replay < 1, "replay", f"must be within [0, 1), got {self.replay}")
