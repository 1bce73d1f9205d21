"""The demo's stand-in for LLaMA: a tiny LLaMA-architecture model trained briefly on the base tokenizer's
English text (Python's docstrings), so that it knows the base tokenizer's language and no Chinese.

This is a plain single-process loop on purpose: it is not part of what the project trains (the project's
trainer trains LoRA + new rows on top of a base; this makes the base). Its data goes through the project's
own preprocessor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BASE_PRETRAIN_STEPS = 200  # enough for the base to model English docstrings, not Chinese
BLOCK = 128


def build_base_model(folder: Path, tokenizer_dir: str, arch: dict, steps: int = BASE_PRETRAIN_STEPS,
                     seed: int = 0) -> dict:
    """Train and save the base model as a Hugging Face folder (with its tokenizer) under folder/hf."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ... import stages
    from ...data.config import PreprocessConfig
    from ...data.loader import TokenBlocks
    from ...data.shards import load_manifest
    from ...progress import Progress
    from ...quiet import name_accelerator
    from ...tokenizer import hf, spm
    from ...tokenizer.base import stdlib_docstrings

    name_accelerator(torch.cuda.is_available())  # save_pretrained imports DeepSpeed, which warns when it guesses

    text = folder / "english.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_docstrings(max_chars=600_000)))
    stages.preprocess(PreprocessConfig(inputs=[str(text)], tokenizer=tokenizer_dir, output=str(folder / "shards"),
                                       block_size=BLOCK, validation_fraction=0.0, overwrite=True))
    blocks = TokenBlocks(folder / "shards", load_manifest(folder / "shards"), "train")
    vocab = spm.fingerprint(tokenizer_dir)["vocab_size"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **arch))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    losses = []
    with Progress("base model", total=steps, unit="step", interval=5) as bar:
        for _ in range(steps):
            x = torch.from_numpy(blocks.take(rng.integers(0, len(blocks), 16)))
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1, f"loss {loss.item():.3f}")
    model.save_pretrained(folder / "hf")
    for name in hf.FOLDER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, folder / "hf" / name)
    shutil.rmtree(folder / "shards")
    return {"folder": str(folder / "hf"), "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": vocab, "english_loss_first": losses[0], "english_loss_last": float(np.mean(losses[-10:]))}
