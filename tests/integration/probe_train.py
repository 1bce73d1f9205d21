"""Run the trainer and record every parameter, gathered, before and after training (rank 0 saves).

    torchrun --nproc_per_node 2 tests/integration/probe_train.py --config run.yaml OUT.pt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from cllama_dist import distributed as dist  # noqa: E402
from cllama_dist.config import load  # noqa: E402
from cllama_dist.model.vocab import is_tied  # noqa: E402
from cllama_dist.trainer.config import TrainConfig  # noqa: E402
from cllama_dist.trainer.loop import Trainer  # noqa: E402


def gather(module) -> dict:
    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if dist.is_main():
                out[name] = p.detach().clone()
    return out


def main() -> None:
    out = sys.argv.pop()
    config = sys.argv[sys.argv.index("--config") + 1]
    trainer = Trainer(load(TrainConfig, config))
    before = gather(trainer.engine.module)
    lm = trainer.engine.module.get_base_model()
    tied = [is_tied(lm)]  # the head's Parameters are the embedding's (a tied model), before and after training
    trainable = {n for n, p in trainer.engine.module.named_parameters() if p.requires_grad}
    opt = trainer.engine.optimizer
    # ZeRO-3 keeps its fp32 partitions in fp32_partitioned_groups_flat, ZeRO-1/2 in single_partition_of_fp32_groups.
    flat = getattr(opt, "fp32_partitioned_groups_flat", None) or opt.single_partition_of_fp32_groups
    optimizer_numel = dist.total(sum(p.numel() for p in flat))
    code = trainer.run()
    after = gather(trainer.engine.module)
    tied.append(is_tied(lm))
    if dist.is_main():
        torch.save({"before": before, "after": after, "trainable": trainable, "code": code,
                    "optimizer_numel": optimizer_numel, "counts": trainer.counts.__dict__,
                    "tied": tied, "state": trainer.start_step}, out)


if __name__ == "__main__":
    main()
