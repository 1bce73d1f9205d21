"""The trainer with faults injected, for tests only: the production code knows nothing of this.

    deepspeed --num_gpus 2 tests/integration/fault_train.py --config run.yaml --fault-nonfinite-steps 4 7 8

--fault-nonfinite-steps: steps (numbered from 1, as logged) whose last micro-batch loss is replaced by
NaN, so that the non-finite handling (skip, agree across ranks, discard earlier micro-batches'
gradients, stop after too many) runs for real.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cllama_dist.config import load  # noqa: E402
from cllama_dist.trainer.config import TrainConfig  # noqa: E402
from cllama_dist.trainer.loop import Trainer  # noqa: E402


class FaultyTrainer(Trainer):
    nonfinite_steps: set[int] = set()

    def micro_batch_loss(self, x, step, micro):
        loss = super().micro_batch_loss(x, step, micro)
        # On the last micro-batch, so that earlier micro-batches' gradients exist and must be discarded.
        if step + 1 in self.nonfinite_steps and micro == self.plan.accum - 1:
            loss = loss * float("nan")
        return loss


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--fault-nonfinite-steps", type=int, nargs="+", default=[])
    p.add_argument("--local-rank", "--local_rank", type=int, default=None)
    args = p.parse_args()
    FaultyTrainer.nonfinite_steps = set(args.fault_nonfinite_steps)
    trainer = FaultyTrainer(load(TrainConfig, args.config))
    return trainer.run()


if __name__ == "__main__":
    sys.exit(main())
