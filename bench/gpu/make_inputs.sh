#!/usr/bin/env bash
# Inputs of the GPU benchmark, made here (CPU) and carried to the device as .gpu/ (git-ignored, ~8 MB):
# the paper's merged tokenizer and packed shards of the fixture corpus at blocks 2,048 and 512.
#   CLLAMA_FIXTURES=../shared/fixtures bash bench/gpu/make_inputs.sh
set -euo pipefail
FIX=${CLLAMA_FIXTURES:-../shared/fixtures}
[ -f "$FIX/llama_tokenizer.model" ] || { echo "no fixtures in $FIX (set CLLAMA_FIXTURES)"; exit 1; }
mkdir -p .gpu
[ -f .gpu/merged/tokenizer.model ] || cllama tokenizer merge --base "$FIX/llama_tokenizer.model" \
    --add "$FIX/chinese_sp.model" --out .gpu/merged
for block in 2048 512; do
    [ -f .gpu/shards$block/manifest.json ] || cllama preprocess --corpus "$FIX/zh_open_mix.jsonl" \
        --tokenizer .gpu/merged --output .gpu/shards$block --block-size $block --validation-fraction 0.02
done
du -sh .gpu/*
