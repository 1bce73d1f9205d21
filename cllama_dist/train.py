"""Train: one process of a training job. Parse, build, train, close.

    deepspeed --num_gpus 2 cllama_dist/train.py --config configs/tiny-cpu.yaml
    torchrun --nproc_per_node 2 -m cllama_dist.train --config configs/tiny-cpu.yaml
    srun python -m cllama_dist.train --config ...
    python -m cllama_dist.train --config configs/llama-7b.yaml --dry-run

The flags are `cllama train`'s (the same parser): `--config`, then any setting as a dotted flag
(`--optim.lr 1e-4`). Exit status: 0 finished; 2 refused input (message on stderr); 3 stopped by
SIGTERM/SIGUSR1 after saving a checkpoint (requeue and resume with --checkpoint.resume auto); 4 stopped after
too many non-finite losses in a row, after saving the last good state.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file by the deepspeed launcher / torchrun
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    from cllama_dist.cli import main as cli

    return cli(["train", *(sys.argv[1:] if argv is None else argv)])


def exit_now(code: int) -> None:
    """Exit once the run has ended: the exit handlers run and the output is flushed, but the interpreter's own
    teardown (freeing the thousands of modules of torch, transformers, DeepSpeed, one by one) is skipped: it took
    2-8 s of every worker's exit on a 2-core machine, which the launcher and the next job wait for. A thread that
    the ordinary exit would wait for (not a daemon) still running gets the ordinary exit."""
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
