#!/usr/bin/env bash
# Issue 7's measurement on one lent GPU (H100/H200): bench/train_throughput.py, the ~1.1B model, sequence 2,048
# then 512, our trainer (new-rows, full) against transformers.Trainer + PEFT modules_to_save, in one run.
#
#   run(carry=[".whl", ".gpu"], timeout_s=560,
#       command="CLLAMA_COMMIT=$(sha) bash bench/gpu/throughput.sh")
#
# .whl/: bench/gpu/fetch_wheels.sh (DeepSpeed and friends, absent on the device image).
# .gpu/: made on the CPU box by `bash bench/gpu/make_inputs.sh`: the paper's merged tokenizer (LLaMA's
#        32,000 + the 20K Chinese model = 49,953) and shards of the fixture corpus at blocks 2,048 and 512.
# Everything lands in $OUT: throughput/results.json, results.md, one log per variant, setup.log.
# The benchmark starts no new variant after 380 s and gives each 150 s, so the whole call stays under 8 minutes.
#
# DRY_RUN=1 bash bench/gpu/throughput.sh: the same script on a CPU box (no wheel install, the --tiny model),
# to check it before spending device time.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ "${DRY_RUN:-0}" = 1 ]; then
    inputs=(--tiny --device cpu --warmup 1 --steps 1)
else
    source bench/gpu/setup.sh > "$OUT/setup.log" 2>&1 || { tail -20 "$OUT/setup.log"; exit 1; }
    tail -3 "$OUT/setup.log"
    for d in .gpu/merged .gpu/shards2048 .gpu/shards512; do
        [ -e "$d" ] || { echo "missing $d: run bench/gpu/make_inputs.sh here and carry .gpu"; exit 1; }
    done
    inputs=(--tokenizer .gpu/merged --shards 2048=.gpu/shards2048 --shards 512=.gpu/shards512)
fi
timeout 470 python3 bench/train_throughput.py "${inputs[@]}" --out "$OUT/throughput" \
    --budget-s 380 --variant-timeout-s 150 --variant zero2:single_process_zero2=true 2>&1 \
    | grep -v "Warning\|warn(" | tee "$OUT/throughput.log" | tail -40
exit "${PIPESTATUS[0]}"
