"""What keeping documents apart (data.document_mask) costs in training speed on the CPU, sdpa and eager.

    PYTHONPATH=$PWD nice -n 10 python3 bench/document_mask.py [--block 512 --micro 4 --steps 12] [--out FILE.json]

One process, one model, one shard set written with the project's ShardWriter with doc_starts (documents of
random lengths, mean --doc-tokens, as `cllama preprocess --record-boundaries` lays them out), read by
trainer/batches.PretrainData. A step = rows() + model_inputs() + forward + backward, as the trainer's
micro-batch does it:
  off  PretrainData without the option: input_ids only, the causal mask, Hugging Face's loss;
  on   PretrainData(document_mask=True): segments -> the block-diagonal mask (bool for sdpa, additive for eager),
       restarting position ids, labels with document starts ignored, summed NLL / loss tokens (masked_nll).
Off and on alternate step by step (after --warmup steps each) so that load from other processes falls on both;
the median and the fastest ms per step are reported, and the median of each on step's time over the off step just
before it (paired: robust to load drifting over seconds). fp32, no DeepSpeed (it adds the same to both).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import REPO, commit

sys.path.insert(0, str(REPO))


def make_shards(folder: Path, block: int, rows: int, doc_tokens: int, vocab: int, seed: int = 0) -> Path:
    from cllama_dist.data.preprocess import build_manifest
    from cllama_dist.data.shards import MANIFEST, ShardWriter

    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < rows * block:
        lengths.append(max(2, int(rng.exponential(doc_tokens))))
    stream = rng.integers(3, vocab, size=sum(lengths)).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    stream[starts] = 1  # BOS opens every document
    folder.mkdir(parents=True)
    w = ShardWriter(folder / "train-000000.arrow", block, np.dtype(np.uint16), True)
    ids = stream[:rows * block].reshape(rows, block)
    w.add(ids, [(starts[(starts >= r * block) & (starts < (r + 1) * block)] - r * block).tolist()
                for r in range(rows)])
    fp = {"sha256": "0" * 64, "vocab_size": vocab, "bos_id": 1, "eos_id": 2, "unk_id": 0}
    settings = {"tokenizer": fp, "block_size": block, "dtype": "uint16", "add_bos": True, "add_eos": False,
                "record_boundaries": True, "validation_fraction": 0.0, "seed": 0}
    m = build_manifest(settings, {"train": {"shards": [w.close()]}}, inputs=[], skipped={}, characters=0,
                       plan={"synthetic": True})
    (folder / MANIFEST).write_text(json.dumps(m))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=128, help="mean document length (exponential)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--impls", nargs="+", default=["sdpa", "eager"])
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cllama_dist.data.shards import load_manifest
    from cllama_dist.model.scoring import masked_nll
    from cllama_dist.trainer.batches import PretrainData, model_inputs

    rows_needed = args.micro * (args.steps + args.warmup)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_shards(Path(tmp) / "s", args.block, rows_needed, args.doc_tokens, args.vocab)
        man = load_manifest(folder)
        datas = {"off": PretrainData(str(folder), man, "train"),
                 "on": PretrainData(str(folder), man, "train", document_mask=True)}
        docs = sum(len(s) for s in datas["on"].blocks.doc_starts(np.arange(rows_needed))) / rows_needed
        for impl in args.impls:
            torch.manual_seed(0)
            cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                              num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                              num_key_value_heads=args.hidden // 64, max_position_embeddings=args.block,
                              tie_word_embeddings=False)
            cfg._attn_implementation = impl
            model = LlamaForCausalLM(cfg).train()
            times: dict[str, list[float]] = {"off": [], "on": []}
            for step in range(args.warmup + args.steps):
                idx = np.arange(step * args.micro, (step + 1) * args.micro)
                for name in ("off", "on"):
                    data = datas[name]
                    t0 = time.perf_counter()
                    rows = data.rows(idx)
                    inputs = model_inputs(rows, "cpu", impl, torch.float32)
                    labels = inputs.pop("labels", None)
                    if data.token_loss:
                        nll, _ = masked_nll(model, inputs, labels)
                        loss = nll.sum() / data.loss_tokens(idx)
                    else:
                        loss = model(input_ids=inputs["input_ids"], labels=inputs["input_ids"]).loss
                    loss.backward()
                    model.zero_grad(set_to_none=True)
                    if step >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
            off, on = (1000 * statistics.median(times[k]) for k in ("off", "on"))
            best_off, best_on = (1000 * min(times[k]) for k in ("off", "on"))
            # each on step against the off step just before it: load that drifts over seconds cancels out
            paired = statistics.median(b / a for a, b in zip(times["off"], times["on"]))
            results.append({"attn": impl, "off_ms": round(off, 1), "on_ms": round(on, 1),
                            "slowdown": round(on / off, 3), "min_off_ms": round(best_off, 1),
                            "min_on_ms": round(best_on, 1), "paired_slowdown": round(paired, 3)})
            print(f"{impl}: median off {off:.1f} ms/step, on {on:.1f} ms/step ({100 * (on / off - 1):+.1f}%); "
                  f"fastest off {best_off:.1f}, on {best_on:.1f} ({100 * (best_on / best_off - 1):+.1f}%); "
                  f"paired {100 * (paired - 1):+.1f}%", flush=True)
    out = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads",
           "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__, "settings": vars(args), "documents_per_block": round(docs, 2),
           "results": results}
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
