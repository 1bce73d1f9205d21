"""Train: parse, build, train, close.

    deepspeed --num_gpus 2 cllama_dist/train.py --config configs/tiny-cpu.yaml
    torchrun --nproc_per_node 2 cllama_dist/train.py --config configs/tiny-cpu.yaml
    srun python -m cllama_dist.train --config ...
    python -m cllama_dist.train --config configs/llama-7b.yaml --dry-run

Exit status: 0 finished; 2 refused input (message on stderr); 3 stopped by SIGTERM/SIGUSR1 after
saving a checkpoint (requeue and resume with --resume auto); 4 stopped after too many non-finite
losses in a row, after saving the last good state.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

if __package__ in (None, ""):  # run as a file by the deepspeed launcher / torchrun
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cllama_dist.config import TrainConfig, add_arguments, from_args, load_yaml  # noqa: E402
from cllama_dist.errors import UserError  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cllama train", description="Train LoRA + new embedding rows with DeepSpeed.")
    p.add_argument("--config", help="YAML run config; flags override it")
    p.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device from its config and print parameter counts")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    add_arguments(p, TrainConfig)
    return p


def dry_run(cfg: TrainConfig) -> None:
    from cllama_dist.model.adapters import dry_run as count
    from cllama_dist.model.adapters import load_llama_config
    from cllama_dist.model.flops import run_flops

    new_vocab = cfg.extended_vocab
    if cfg.tokenizer:
        from cllama_dist.tokenizer import spm

        new_vocab = spm.fingerprint(cfg.tokenizer)["vocab_size"]
    config = load_llama_config(cfg)
    new_vocab = new_vocab or config.vocab_size
    mixed = cfg.dtype != "fp32"
    print(f"dry run: {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocabulary "
          f"{config.vocab_size:,} -> {new_vocab:,}, LoRA r {cfg.lora_rank} on {', '.join(cfg.lora_targets)}")
    for mode, c in count(cfg, new_vocab).items():
        f = run_flops(config, config.vocab_size, new_vocab, mode, cfg.block_size or 512, c.lora,
                      cfg.gradient_checkpointing)
        print(f"  embeddings: {mode:8s} total {c.total:,}  LoRA {c.lora:,}  new rows {c.new_rows:,}  "
              f"trainable {c.trainable:,} ({100 * c.share:.2f}%)  optimizer state "
              f"{c.optimizer_bytes(mixed) / 2**30:.2f} GiB ({'fp32 master + ' if mixed else ''}AdamW moments)  "
              f"FLOPs/token at {cfg.block_size or 512}: {f['actual'] / 1e9:.2f} G computed, "
              f"{f['conventional'] / 1e9:.2f} G conventional 6N")


def quiet_library_warnings() -> None:
    # Deprecation notices from inside torch.distributed and transformers, once per collective call: they
    # drown the training log and are nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*(gradient_checkpointing|is_gradient_checkpointing).*deprecated",
                            category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    quiet_library_warnings()
    try:
        cfg = from_args(TrainConfig, args, load_yaml(args.config) if args.config else {})
        if args.dry_run:
            dry_run(cfg)
            return 0
        from cllama_dist.trainer import train

        return train(cfg)
    except UserError as exc:
        print(f"cllama train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
