#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the integration tests.
#
#   bash tests/slurm/cluster.sh install            # apt-get slurm-wlm + munge (root; only when asked)
#   eval "$(bash tests/slurm/cluster.sh start)"    # start it; stdout is one `export SLURM_CONF=...` line
#   bash tests/slurm/cluster.sh status             # daemons and `sinfo`; exit 0 when all up, nodes idle
#   bash tests/slurm/cluster.sh stop               # cancel its jobs, stop its daemons by their pid files
#
# Every subcommand but `install` takes an optional STATE_DIR (default $CLLAMA_SLURM_DIR or
# /tmp/cllama-slurm). Everything the cluster writes lives there: slurm.conf, its own munge key and
# socket, pid files, spool directories and logs. Nothing is written under /etc, and no system
# service is touched, so a machine that already runs Slurm or munge is left alone (the ports are
# non-default for the same reason). Two `slurmd -N n1`/`-N n2` on distinct ports with
# NodeAddr=127.0.0.1 make two nodes out of one host (Debian's slurmd is built with multiple-slurmd
# support). Runs as root: slurmd must be able to start jobs as the submitting user.
set -euo pipefail

STATE_DIR_DEFAULT="${CLLAMA_SLURM_DIR:-/tmp/cllama-slurm}"
# Ports: controller, then one per slurmd. Override with CLLAMA_SLURM_PORT if 16817-16819 are taken.
PORT_BASE="${CLLAMA_SLURM_PORT:-16817}"
NODES=(n1 n2)
START_TIMEOUT="${CLLAMA_SLURM_START_TIMEOUT:-60}"

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# --- state layout -------------------------------------------------------------------------------
set_paths() {
    STATE="${1:-$STATE_DIR_DEFAULT}"
    case "$STATE" in /*) ;; *) STATE="$(pwd)/$STATE" ;; esac
    CONF="$STATE/slurm.conf"
    MUNGE_DIR="$STATE/munge"
    # A unix socket path is limited to 107 bytes; keep STATE short.
    MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
    MUNGE_KEY="$MUNGE_DIR/munge.key"
    MUNGE_PID="$STATE/munged.pid"
    CTLD_PID="$STATE/slurmctld.pid"
    [ "${#MUNGE_SOCKET}" -lt 100 ] || die "STATE_DIR path too long for a unix socket: $STATE"
}

slurmd_pid_file() { echo "$STATE/slurmd-$1.pid"; }

# Prints the pid in FILE if that process is alive and its command name is NAME (guards against a
# stale pid file whose number was reused by an unrelated process).
live_pid() {
    local file="$1" name="$2" pid comm
    [ -s "$file" ] || return 1
    pid="$(tr -dc '0-9' <"$file")"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    [ "$comm" = "$name" ] || return 1
    echo "$pid"
}

# Clients read the config via SLURM_CONF; export it for the commands run from this script.
slurm_env() { SLURM_CONF="$CONF" "$@"; }

# "n1 idle" lines -> number of nodes in state idle (mixed/alloc don't count: that is 'busy').
idle_count() {
    { slurm_env sinfo -h -N -o '%N %t' 2>/dev/null || true; } | awk '$2 == "idle" {n++} END {print n+0}'
}

# --- install ------------------------------------------------------------------------------------
cmd_install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
        && command -v munged >/dev/null; then
        log "slurm-wlm and munge already installed: $(slurmctld -V)"
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "install needs root (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Recommends would drag in ~20 -dev and optional plugin packages; slurmd/slurmctld already depend
    # on slurm-wlm-basic-plugins, which has every plugin slurm.conf below names.
    apt-get install -y -q --no-install-recommends slurm-wlm munge
    log "installed: $(slurmctld -V)"
}

# --- config -------------------------------------------------------------------------------------
write_conf() {
    local ctld_port="$PORT_BASE" i port tmp
    tmp="$(mktemp "$STATE/slurm.conf.XXXXXX")"
    {
        cat <<EOF
# Written by tests/slurm/cluster.sh: two nodes on this one machine, for integration tests.
ClusterName=cllama
# slurmctld accepts "localhost" as its own name, so this file does not depend on the hostname.
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
# Root runs the daemons (no slurm user/spool setup needed); jobs run as whoever submits them.
SlurmUser=root
SlurmdUser=root
# Our own munged, on our own socket, so a system munge (or its absence) does not matter.
# cred_expire (default 120 s) is also how long a requeued job waits before it may start again.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$STATE/ctld
# %n = node name: each slurmd needs its own spool dir, pid file and log.
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
# No mail server here; /bin/true keeps slurmctld from logging an error about MailProg.
MailProg=/bin/true
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: track job processes through /proc, bind nothing. Works in containers and VMs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct prints an error, submitit falls back to squeue and its own result files.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
# Allocate cores, not memory: several small jobs may share a node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every 5 s, not 60/30 s: a requeued job starts again within ~15 s.
SchedulerParameters=sched_interval=5,bf_interval=5
# Batch jobs may be requeued (sbatch --requeue, scontrol requeue, node failure).
JobRequeue=1
# A node that was DOWN comes back as soon as its slurmd registers with a valid config.
ReturnToService=2
# Keep finished jobs visible to squeue/scontrol (sbatch --wait and submitit read them) for 5 min.
MinJobAge=300
# Short timeouts keep the tests quick: SIGTERM -> SIGKILL after 5 s on cancel/timeout.
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
# Nodes declare less than the machine has (both share its 2 CPUs): trust this file, not the probe.
SlurmdParameters=config_overrides
EOF
        i=1
        for n in "${NODES[@]}"; do
            port=$((PORT_BASE + i))
            echo "NodeName=$n NodeAddr=127.0.0.1 NodeHostname=$n Port=$port CPUs=2 RealMemory=4000 State=UNKNOWN"
            i=$((i + 1))
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
    } >"$tmp"
    mv -f "$tmp" "$CONF"
    chmod 644 "$CONF"
}

# --- start --------------------------------------------------------------------------------------
start_munged() {
    if live_pid "$MUNGE_PID" munged >/dev/null; then return 0; fi
    mkdir -p "$MUNGE_DIR"
    # munged refuses a socket directory that others can write and a key that others can read; the
    # directory stays searchable so that non-root users (and their jobs) can reach the socket.
    chmod 755 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_KEY" ]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chmod 400 "$MUNGE_KEY"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: munged runs as root here and its socket lives under /tmp (world-writable parent).
    munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="$MUNGE_PID" \
        --log-file="$STATE/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
    wait_for "munged" 10 test -S "$MUNGE_SOCKET"
}

start_slurmctld() {
    if live_pid "$CTLD_PID" slurmctld >/dev/null; then return 0; fi
    mkdir -p "$STATE/ctld"
    # -c: forget jobs and node states of a previous run in this STATE_DIR, so each start is clean.
    slurmctld -c -f "$CONF"
    wait_for "slurmctld" 20 bash -c "SLURM_CONF='$CONF' scontrol ping 2>/dev/null | grep -q UP"
}

start_slurmd() {
    local n="$1"
    if live_pid "$(slurmd_pid_file "$n")" slurmd >/dev/null; then return 0; fi
    mkdir -p "$STATE/spool/$n"
    slurmd -N "$n" -f "$CONF"
}

# wait_for WHAT SECONDS CMD...: poll CMD every 0.5 s.
wait_for() {
    local what="$1" secs="$2" i
    shift 2
    for ((i = 0; i < secs * 2; i++)); do
        if "$@"; then return 0; fi
        sleep 0.5
    done
    die "$what did not come up within ${secs}s; see logs in $STATE"
}

cmd_start() {
    set_paths "${1:-}"
    for b in munged slurmctld slurmd sinfo; do
        command -v "$b" >/dev/null || die "$b not found: run 'bash $0 install' (as root) first"
    done
    [ "$(id -u)" = 0 ] || die "start needs root (slurmd runs jobs as the submitting user)"
    mkdir -p "$STATE"
    # Rewrite the config only while none of our daemons runs; a running cluster keeps its own.
    if ! any_running; then write_conf; fi
    local t0=$SECONDS
    start_munged
    start_slurmctld
    for n in "${NODES[@]}"; do start_slurmd "$n"; done
    local i ok=0
    for ((i = 0; i < START_TIMEOUT * 2; i++)); do
        if [ "$(idle_count)" -ge "${#NODES[@]}" ]; then ok=1; break; fi
        # A node left DOWN/DRAIN by an earlier run: ask the controller to take it back.
        # (`|| true`: under pipefail a controller that is still busy must not end the script.)
        { slurm_env sinfo -h -N -o '%N %t' 2>/dev/null || true; } | awk '$2 ~ /^(down|drain|drng)/ {print $1}' |
            while read -r n; do slurm_env scontrol update NodeName="$n" State=RESUME 2>/dev/null || true; done
        sleep 0.5
    done
    if [ "$ok" != 1 ]; then
        slurm_env sinfo -N >&2 || true
        die "nodes not idle after ${START_TIMEOUT}s; see logs in $STATE"
    fi
    log "cluster up in $((SECONDS - t0))s: $(slurm_env sinfo -h -N -o '%N=%t' | tr '\n' ' ')"
    # The one line on stdout, so that `eval "$(cluster.sh start)"` sets up the caller's shell.
    echo "export SLURM_CONF=$CONF"
}

# --- stop ---------------------------------------------------------------------------------------
any_running() {
    live_pid "$MUNGE_PID" munged >/dev/null && return 0
    live_pid "$CTLD_PID" slurmctld >/dev/null && return 0
    for n in "${NODES[@]}"; do live_pid "$(slurmd_pid_file "$n")" slurmd >/dev/null && return 0; done
    return 1
}

# kill_pidfiles NAME FILE...: SIGTERM the pids in FILEs (each only if its process is NAME), then
# wait up to 15 s for all of them (each daemon takes 1-2 s to save state), then SIGKILL the rest.
kill_pidfiles() {
    local name="$1" file pid i pids=()
    shift
    for file in "$@"; do
        if pid="$(live_pid "$file" "$name")"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        rm -f "$file"
    done
    for pid in "${pids[@]}"; do
        for ((i = 0; i < 30; i++)); do
            [ -d "/proc/$pid" ] || break
            sleep 0.5
        done
        if [ -d "/proc/$pid" ]; then
            log "$name ($pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        else
            log "stopped $name ($pid)"
        fi
    done
}

cmd_stop() {
    set_paths "${1:-}"
    [ -d "$STATE" ] || { log "nothing to stop in $STATE"; return 0; }
    # Cancel this cluster's jobs first, so that their slurmstepd processes end while slurmd still
    # runs (they are not in any pid file and would otherwise outlive the daemons).
    if live_pid "$CTLD_PID" slurmctld >/dev/null; then
        local jobs i
        jobs="$(slurm_env squeue -h -o %i 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086  # one argument per job id
            slurm_env scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 40; i++)); do
                [ -z "$(slurm_env squeue -h -t R,CG,S -o %i 2>/dev/null || true)" ] && break
                sleep 0.5
            done
        fi
    fi
    local files=()
    for n in "${NODES[@]}"; do files+=("$(slurmd_pid_file "$n")"); done
    kill_pidfiles slurmd "${files[@]}"
    kill_pidfiles slurmctld "$CTLD_PID"
    kill_pidfiles munged "$MUNGE_PID"
}

# --- status -------------------------------------------------------------------------------------
cmd_status() {
    set_paths "${1:-}"
    local pid down=0
    echo "state dir: $STATE"
    for spec in "munged:$MUNGE_PID" "slurmctld:$CTLD_PID" \
        "slurmd:$(slurmd_pid_file n1)" "slurmd:$(slurmd_pid_file n2)"; do
        if pid="$(live_pid "${spec#*:}" "${spec%%:*}")"; then
            echo "  ${spec%%:*} running (pid $pid, $(basename "${spec#*:}"))"
        else
            echo "  ${spec%%:*} not running ($(basename "${spec#*:}"))"
            down=1
        fi
    done
    if live_pid "$CTLD_PID" slurmctld >/dev/null; then
        slurm_env sinfo -N || true
        echo "export SLURM_CONF=$CONF"
    fi
    # The controller notices a dead slurmd only after SlurmdTimeout, so check the pids too.
    [ "$down" = 0 ] && [ "$(idle_count)" -ge "${#NODES[@]}" ]
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop "${2:-}" ;;
    status) cmd_status "${2:-}" ;;
    *) usage ;;
esac
