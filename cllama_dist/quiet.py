"""Third-party noise off by default, on every rank; ``--verbose`` (or CLLAMA_VERBOSE=1) shows it all.

What a run printed before, and what is done about each:
- transformers' and datasets' info/advisory lines and progress bars ("Loading checkpoint shards", "Writing
  model shards", the use_cache note twice): their own verbosity switches, set before they are imported;
- DeepSpeed's INFO lines on every rank and its accelerator warning: its logger at WARNING, and
  DS_ACCELERATOR named explicitly (the warning is about guessing it);
- "deepspeed_shm_comm_op built successfully", printed by DeepSpeed on every rank: ``muted_stdout`` around
  the process-group set-up;
- deprecation warnings raised inside the libraries (FutureWarning from transformers, peft,
  torch.distributed), which a user cannot act on.
The environment variables are inherited by the processes a launcher starts, so every rank is quiet too.
Our own progress bars pass their settings explicitly and are not affected.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings


def verbose() -> bool:
    return os.environ.get("CLLAMA_VERBOSE", "") not in ("", "0")


def quiet_third_party(verbose_output: bool = False) -> None:
    if verbose_output:
        os.environ["CLLAMA_VERBOSE"] = "1"
    if verbose():
        return
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("DATASETS_VERBOSITY", "error"),
                        ("TQDM_DISABLE", "1"), ("WANDB_SILENT", "true")):
        os.environ.setdefault(name, value)
    for module in ("transformers", "peft", "torch", "deepspeed", "accelerate", "datasets"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated")
    warnings.filterwarnings("ignore", message=r".*(gradient_checkpointing|is_gradient_checkpointing).*deprecated")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def name_accelerator(cuda: bool) -> None:
    """DeepSpeed warns when it guesses the accelerator; tell it instead (unless the user did)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")


@contextlib.contextmanager
def muted_stdout():
    """Swallow what third-party code prints to stdout (not warnings, not errors) unless verbose."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
