"""Starting the trainer's processes: the one launch helper the demo, the tests, the benchmarks and
`cllama train --nproc-per-node N` share.

    command(["--config", "run.yaml"], nproc=2, launcher="torchrun")   # the argv of a 2-process job
    environment(cpu=True)                                               # DS_ACCELERATOR=cpu, threads, PYTHONPATH

torchrun and DeepSpeed's launcher both start ``nproc`` workers with RANK/LOCAL_RANK/WORLD_SIZE set and a
rendezvous on 127.0.0.1 at a free port; ``single_process_env`` gives one process the same variables
without a launcher (a benchmark worker, a debugger).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from .. import PROJECT_ROOT
from ..distributed import free_port, is_port_in_use_error, port_in_use, require_free_port

TRAIN_SCRIPT = PROJECT_ROOT / "cllama_dist" / "train.py"
Launcher = Literal["torchrun", "deepspeed"]


def command(args: Sequence[str], nproc: int, launcher: Launcher = "torchrun", script: str | Path = TRAIN_SCRIPT,
            port: int | None = None) -> list[str]:
    """The command that starts ``nproc`` processes of ``script`` (default: the trainer) with ``args``."""
    port = port or free_port()
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    elif launcher == "deepspeed":
        runner = shutil.which("deepspeed")
        head = [runner] if runner else [sys.executable, "-m", "deepspeed.launcher.runner"]
        head += ["--num_gpus", str(nproc), "--master_port", str(port)]
    else:
        raise ValueError(f"unknown launcher {launcher!r}; expected torchrun or deepspeed")
    return [*head, str(script), *args]


def environment(cpu: bool, nproc: int = 1, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a local job: this checkout importable, unbuffered output, and on the CPU DeepSpeed's
    CPU accelerator with the cores shared out between the processes (two processes on two cores must not
    oversubscribe them: each would spin a thread pool of two)."""
    env = dict(os.environ if base is None else base, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if cpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        env["DS_ACCELERATOR"] = "cpu"
    return env


def single_process_env(cpu: bool, base: dict[str, str] | None = None) -> dict[str, str]:
    """One process as rank 0 of a world of 1, without a launcher."""
    env = environment(cpu, 1, base)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def launch_train(args: Sequence[str], nproc: int, launcher: Launcher = "torchrun", nnodes: int = 1,
                 node_rank: int = 0, master_addr: str = "127.0.0.1", master_port: int = 0) -> int:
    """Run ``python -m cllama_dist.train ARGS`` as ``nproc`` processes per node under torchrun or DeepSpeed's
    launcher, from any folder; returns the job's exit status (a worker's own: 2 refused input, 3 stopped
    after saving, 4 non-finite losses).

    torchrun runs in this process; when a worker fails, its message is already on stderr, and torchrun's own
    traceback of the failure is replaced by one line.

    Ctrl-C and SIGTERM: torchrun starts each worker in a session of its own, so a terminal's Ctrl-C reaches
    torchrun alone; it passes the signal on to the workers, which save at the next step boundary and exit 3,
    and SIGKILLs those still running after its shutdown timeout (30 s; TORCH_ELASTIC_SHUTDOWN_TIMEOUT), then
    raises: that is reported in one line, with the shell's status for a signal (128 + its number).
    """
    import signal

    import torch

    port = master_port or (free_port() if nnodes == 1 else 29500)
    if node_rank == 0:  # the node that holds the rendezvous store: its port must be free here
        require_free_port(port)
    cpu = not torch.cuda.is_available() or os.environ.get("DS_ACCELERATOR") == "cpu"
    os.environ.update(environment(cpu, nproc, base={}))
    if launcher == "deepspeed":
        import subprocess

        runner = shutil.which("deepspeed")
        head = [runner] if runner else [sys.executable, "-m", "deepspeed.launcher.runner"]
        cmd = [*head, "--num_gpus", str(nproc), "--num_nodes", str(nnodes), "--master_addr", master_addr,
               "--master_port", str(port), "--module", "cllama_dist.train", *args]
        if nnodes > 1:
            cmd[cmd.index("--num_nodes"):cmd.index("--num_nodes") + 2] = ["--num_nodes", str(nnodes),
                                                                        "--node_rank", str(node_rank)]
        # Its workers share the terminal's process group: Ctrl-C reaches them directly. Here it only waits for
        # the launcher (subprocess.run would SIGKILL it 0.25 s after a KeyboardInterrupt); on Ctrl-C DeepSpeed's
        # launcher also sends the workers SIGTERM, SIGKILLs them 30 s later (fixed) and exits 1.
        previous = signal.signal(signal.SIGINT, _wait_for_launcher)
        try:
            return subprocess.run(cmd, check=False, env=os.environ).returncode
        finally:
            signal.signal(signal.SIGINT, previous)
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    targs = parse_args(["--nproc_per_node", str(nproc), "--nnodes", str(nnodes), "--node_rank", str(node_rank),
                        "--master_addr", master_addr, "--master_port", str(port), "-m", "cllama_dist.train", *args])
    try:
        run(targs)
    except DistNetworkError as exc:  # the port was taken between the check above and torchrun's bind
        if is_port_in_use_error(exc):
            raise port_in_use(port) from None
        raise
    except SignalException as exc:
        print(f"cllama train: {signal.Signals(exc.sigval).name} received: torchrun passed it to the {nproc} "
              "processes here, which save at the next step boundary (see 'saved checkpoint' above) unless killed after "
              "its shutdown timeout; the same command resumes",
              file=sys.stderr)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        codes = sorted({f.exitcode for f in exc.failures.values()})
        code = next((c for c in codes if c in (2, 3, 4)), codes[0] if codes else 1)
        if code not in (2, 3, 4):
            print(f"cllama train: {len(exc.failures)} of {nproc * nnodes} processes failed (exit status "
                  f"{', '.join(map(str, codes))}); their messages are above", file=sys.stderr)
        return code if code > 0 else 1
    return 0


def _wait_for_launcher(signum, frame) -> None:
    """Ctrl-C while DeepSpeed's launcher runs: it and the workers have it too; keep waiting for their exit."""
