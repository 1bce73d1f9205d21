#!/usr/bin/env bash
# The trainer on one GPU (nccl, bf16, ZeRO-3, checkpointing), both embedding modes, 1.1B model, seq 2048.
#   run(carry=[".whl", ".gpu"], command="bash bench/gpu/trainer_smoke.sh")
# .gpu/ holds the paper's merged tokenizer and shards of the fixture corpus (block 2048), made on the CPU box.
set -uo pipefail
source bench/gpu/setup.sh || exit 1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for mode in new-rows full; do
    timeout 200 python3 -m torch.distributed.run --nproc_per_node 1 --master_port 29511 cllama_dist/train.py \
        --config configs/tinyllama-1b.yaml --model.tokenizer .gpu/merged --data.path .gpu/shards2048 \
        --output-dir /tmp/run-$mode --model.embeddings $mode --optim.max-steps 16 --checkpoint.resume "" 2>&1 \
        | grep -v "Warning\|warn(" | tee "$OUT/train-$mode.log" | grep -v "^\[20" | tail -25
    cp /tmp/run-$mode/metrics.jsonl "$OUT/metrics-$mode.jsonl" 2>/dev/null
done
