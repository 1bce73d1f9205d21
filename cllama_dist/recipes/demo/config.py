"""Settings of ``cllama demo``."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PathStr, Section, check, option

DEMO_STEPS = 60  # ~3.5 passes over the demo's 36K training tokens; more only overfits them
DEMO_SFT_STEPS = 60


@dataclass
class DemoConfig(Section):
    """The whole pipeline on the shipped corpus (CPU, tiny model)."""

    out: PathStr = option("runs/demo", "Folder for every artefact.")
    base_tokenizer: PathStr = option("", "A real base SentencePiece model (e.g. LLaMA's tokenizer.model); default: "
                                         "build one offline.")
    force: bool = option(False, "Redo every stage instead of reusing finished ones.")
    steps: int = option(DEMO_STEPS, "Training steps of the 2-process ZeRO-3 stage.")
    sft_steps: int = option(DEMO_SFT_STEPS, "Steps of the instruction-tuning stage (2-process ZeRO-3).")
    until: str = option("", "Stop after this stage (see `cllama demo --help` for the list).")

    def validate(self) -> None:
        from .recipe import STAGE_NAMES

        check(self.steps >= 1, "steps", f"must be at least 1, got {self.steps}")
        check(self.sft_steps >= 1, "sft_steps", f"must be at least 1, got {self.sft_steps}")
        check(not self.until or self.until in STAGE_NAMES, "until",
              f"{self.until!r}: not a stage; the stages are {', '.join(STAGE_NAMES)}")
