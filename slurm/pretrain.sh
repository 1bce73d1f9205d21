#!/usr/bin/env bash
# Train across every node of the allocation: one torchrun per node, rendezvous at the first node.
#
#   sbatch slurm/pretrain.sh configs/llama-7b.yaml                     # 2 nodes x 8 GPUs (the defaults below)
#   sbatch -N 4 -p a100 -t 2-00:00:00 slurm/pretrain.sh configs/llama-7b.yaml --optim.lr 1e-4
#   CLLAMA_DEVICE=cpu SBATCH_GPUS_PER_NODE=0 sbatch slurm/pretrain.sh run.yaml   # CPU nodes (gloo), as CI runs it
#
# Every setting below is a default: sbatch options (-N, -p, -t, --gpus-per-node, ...) and SBATCH_*
# environment variables override the #SBATCH lines; the environment variables further down override the
# rest. Extra arguments after the config go to the trainer (cllama_dist/train.py flags).
#
# Preemption and time limits: Slurm sends USR1 to this script 5 minutes before the limit (--signal); the
# trap touches RUN_DIR/STOP, every rank sees it at the next step boundary and saves a checkpoint together,
# the trainer exits, and this script requeues the job (--requeue keeps its id, so RUN_DIR is the same) which
# then resumes with --checkpoint.resume auto. A preemption (SIGTERM to everything) takes the same path.
#
#SBATCH --job-name=cllama-pretrain
#SBATCH --nodes=2                   # nodes; override with sbatch -N
#SBATCH --ntasks-per-node=1         # one launcher per node: torchrun starts the per-GPU processes
#SBATCH --gpus-per-node=8           # GPUs per node (0 on CPU nodes: SBATCH_GPUS_PER_NODE=0)
#SBATCH --exclusive                 # whole nodes: every core of a node goes to its GPU processes (below)
#SBATCH --time=24:00:00             # wall-clock limit of one attempt; the job requeues itself after it
#SBATCH --signal=B:USR1@300         # USR1 to this script 300 s before the limit: time to save
#SBATCH --requeue                   # allow scontrol requeue (also after preemption)
#SBATCH --open-mode=append          # requeued attempts append to the same log
#SBATCH --output=%x-%j.out          # the log: in the submit directory, job name and id
# (partition: the cluster's default; choose with sbatch -p NAME or SBATCH_PARTITION=NAME)

set -euo pipefail

usage() { sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
fi
if [[ -z ${SLURM_JOB_ID:-} || -z ${SLURM_JOB_NODELIST:-} ]]; then
    echo "slurm/pretrain.sh: not inside a Slurm job (no SLURM_JOB_ID): submit it with" \
         "'sbatch slurm/pretrain.sh CONFIG.yaml [trainer flags]'; without Slurm, start the trainer with" \
         "'torchrun --nproc_per_node N -m cllama_dist.train --config CONFIG.yaml'" >&2
    exit 2
fi

CONFIG=${1:-${CONFIG:-configs/llama-7b.yaml}}   # the run config (YAML)
shift $(( $# > 0 ? 1 : 0 ))
PYTHON=${PYTHON:-python3}                          # the Python that has cllama-dist installed
CLLAMA_DEVICE=${CLLAMA_DEVICE:-gpu}                # gpu: nccl, one process per GPU; cpu: gloo
if [[ $CLLAMA_DEVICE == cpu ]]; then
    NPROC_PER_NODE=${NPROC_PER_NODE:-1}
    export DS_ACCELERATOR=cpu
else
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
fi
cd "${SLURM_SUBMIT_DIR:-.}"

# The run folder: RUN_DIR if given, else the config's output_dir. Same job id after a requeue, same folder.
RUN_DIR=${RUN_DIR:-$("$PYTHON" -c 'import sys
from cllama_dist.config import load_yaml
from cllama_dist.errors import UserError
try:
    print(load_yaml(sys.argv[1]).get("output_dir") or "runs/train")
except UserError as exc:
    sys.exit(f"slurm/pretrain.sh: {exc}")' "$CONFIG")}
mkdir -p "$RUN_DIR"
STOP_FILE=$RUN_DIR/STOP

# Rendezvous: the first node's address as Slurm knows it (NodeAddr; node names need not resolve), and a
# port derived from the job id so that two jobs sharing a node do not collide.
FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$FIRST_NODE" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
NNODES=$SLURM_JOB_NUM_NODES

# The DeepSpeed JSON is the run config's (engine.deepspeed_config). Its default, auto, takes
# zero3_multinode.json on GPUs across nodes (ZeRO++ hierarchical partitioning within each node, no weight
# quantization: numerics unchanged) and zero3.json otherwise; the trainer prints which it used.

# Network settings large clusters need; uncomment what applies to yours.
# export NCCL_SOCKET_IFNAME=ib0            # the interface for NCCL's bootstrap (not docker0/lo)
# export NCCL_IB_HCA=mlx5                  # InfiniBand adapters to use
# export NCCL_IB_GID_INDEX=3               # RoCE: the GID index of the RDMA interface
# export NCCL_NET_GDR_LEVEL=PHB            # GPUDirect RDMA up to the PCIe host bridge
# export NCCL_DEBUG=WARN                   # INFO when diagnosing hangs
# export NCCL_ASYNC_ERROR_HANDLING=1       # fail instead of hanging on a lost peer
# export TORCH_NCCL_BLOCKING_WAIT=0
# The node's cores shared out between its processes (8 GPUs on a 96-core node: 12 threads each); a job
# allocated on part of a node (sbatch -c N without --exclusive in a copy of this script) gets N / processes.
CORES=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / NPROC_PER_NODE > 0 ? CORES / NPROC_PER_NODE : 1 ))}
export PYTHONUNBUFFERED=1

STOPPING=0
on_signal() {
    echo "[pretrain.sh] $1 received at $(date -Is): asking every rank to save at the next step boundary"
    STOPPING=1
    touch "$STOP_FILE"
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

echo "[pretrain.sh] job $SLURM_JOB_ID attempt ${SLURM_RESTART_COUNT:-0}: $NNODES nodes x $NPROC_PER_NODE processes," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, config $CONFIG, run $RUN_DIR"
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
    "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m cllama_dist.train --config "$CONFIG" --output-dir "$RUN_DIR" --checkpoint.resume auto "$@" &
SRUN=$!
# `wait` returns early when a trapped signal arrives; keep waiting for srun itself.
set +e
while true; do
    wait "$SRUN"
    rc=$?
    kill -0 "$SRUN" 2>/dev/null || break
done
set -e

if (( STOPPING )); then
    echo "[pretrain.sh] trainer stopped (exit $rc); requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "[pretrain.sh] trainer finished with exit status $rc"
exit "$rc"
