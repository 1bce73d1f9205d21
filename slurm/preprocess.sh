#!/usr/bin/env bash
# Tokenize a corpus into shards on CPU nodes: a Slurm job array, then the finalize step as a dependent job.
#
#   bash slurm/preprocess.sh 16 --corpus /data/zh/ --tokenizer out/merged --output /data/shards-512 --block-size 512
#   PARTITION=cpu TIME=04:00:00 CPUS=32 bash slurm/preprocess.sh 64 --config preprocess.yaml
#   STAGE=preprocess-sft bash slurm/preprocess.sh 4 --inputs alpaca_zh.jsonl --tokenizer out/merged --output sft/
#
# Run it on a login node (it submits, it does not compute): the first argument is the number of array
# tasks, the rest are `cllama preprocess` flags (`cllama preprocess-sft` flags with STAGE=preprocess-sft,
# for instruction data). Each array task takes a disjoint, deterministic part of
# the input (by file and byte range; --num-tasks/--task-id come from SLURM_ARRAY_TASK_COUNT/ID); the
# finalize job runs only if every task succeeded (afterok) and writes manifest.json. A failed or killed
# task is simply resubmitted (`sbatch --array=N ...` or the whole command again): finished groups are kept.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help || $# == 0 ]]; then
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    exit $(( $# == 0 ? 2 : 0 ))
fi

PYTHON=${PYTHON:-python3}               # the Python that has cllama-dist installed
PARTITION=${PARTITION:-}                # partition for both jobs (default: the cluster's default)
TIME=${TIME:-12:00:00}                  # time limit of one array task
CPUS=${CPUS:-16}                        # cores per task: the preprocessor starts one worker per core
MEM=${MEM:-}                            # memory per task (e.g. 32G); default: the partition's
LOG_DIR=${LOG_DIR:-.}                   # where the tasks' logs go
STAGE=${STAGE:-preprocess}              # preprocess (a corpus) or preprocess-sft (instruction data)
[[ $STAGE == preprocess || $STAGE == preprocess-sft ]] || {
    echo "slurm/preprocess.sh: STAGE must be preprocess or preprocess-sft, got '$STAGE'" >&2; exit 2; }

if [[ ${1:-} == __task ]]; then         # inside an array task
    shift
    exec "$PYTHON" -m cllama_dist.cli "$STAGE" --workers "${SLURM_CPUS_PER_TASK:-0}" "$@"
fi
if [[ ${1:-} == __finalize ]]; then     # inside the dependent job
    shift
    exec "$PYTHON" -m cllama_dist.cli "$STAGE" finalize "$@"
fi

TASKS=$1
shift
command -v sbatch > /dev/null || { echo "slurm/preprocess.sh: sbatch not found: run this on a Slurm login node, or" \
    "without Slurm run 'cllama $STAGE ... --num-tasks N --task-id K' for each K, then 'cllama $STAGE finalize'" >&2; exit 2; }
[[ $TASKS =~ ^[1-9][0-9]*$ ]] || { echo "slurm/preprocess.sh: NUM_TASKS must be a positive integer, got '$TASKS'" >&2; exit 2; }

SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
COMMON=(--parsable --chdir "$PWD" --export ALL)
[[ -n $PARTITION ]] && COMMON+=(--partition "$PARTITION")
[[ -n $MEM ]] && COMMON+=(--mem "$MEM")

# Check the flags, tokenizer and inputs now, on the login node, rather than in 16 failing array tasks an
# hour from now; this also writes the output folder's plan once, so that the tasks do not race to.
"$PYTHON" -m cllama_dist.cli "$STAGE" prepare "$@" --num-tasks "$TASKS" --task-id 0

ARRAY=$(sbatch "${COMMON[@]}" --job-name "cllama-$STAGE" --array "0-$((TASKS - 1))" --nodes 1 --ntasks 1 \
        --cpus-per-task "$CPUS" --time "$TIME" --output "$LOG_DIR/%x-%A_%a.out" \
        "$SCRIPT" __task "$@")
FINAL=$(sbatch "${COMMON[@]}" --job-name "cllama-$STAGE-finalize" --dependency "afterok:$ARRAY" \
        --nodes 1 --ntasks 1 --cpus-per-task 1 --time 01:00:00 --output "$LOG_DIR/%x-%j.out" \
        "$SCRIPT" __finalize "$@")
echo "submitted array job $ARRAY ($TASKS tasks) and finalize job $FINAL (runs after all succeed)"
echo "watch: squeue -j $ARRAY,$FINAL    logs: $LOG_DIR/cllama-$STAGE-${ARRAY}_*.out"
