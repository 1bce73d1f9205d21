"""All distributed plumbing: process-group set-up, rank queries, collectives, and stop signals.

Nothing else in the project reads RANK/LOCAL_RANK/WORLD_SIZE/SLURM_* or calls torch.distributed.

Launchers: ``deepspeed`` and ``torchrun`` export RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT. Plain ``srun`` exports only SLURM_* (docs/hazards.md#h8: ``deepspeed.init_distributed`` does not
read those), so they are mapped here; the rendezvous address is the first node's NodeAddr from
``scontrol`` because node names need not resolve.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")


# SIGTERM: preemption and scancel; SIGUSR1: Slurm's --signal=USR1@T warning; SIGUSR2: submitit's; SIGINT:
# Ctrl-C (a second Ctrl-C aborts without saving).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

# Rank 0's own work that the other ranks wait for (shard verification, universal conversion) may take long;
# its outcome, success or error, reaches them as soon as it is known, over a CPU (gloo) group of its own.
LONG_WAIT = datetime.timedelta(hours=2)
_control = None


def free_port() -> int:
    """A TCP port free on this machine now: the rendezvous port of a job started here (demo, tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_node_addr(nodelist: str) -> str:
    """The address of the first node of a Slurm node list (NodeAddr, which may differ from its name)."""
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]
    try:
        out = subprocess.run(["scontrol", "show", "node", first], capture_output=True, text=True, check=True).stdout
        for field in out.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
    except (OSError, subprocess.CalledProcessError):
        pass
    return first


def slurm_port(job_id: str | None) -> int:
    # Derived from the job id so that two jobs sharing a node do not pick the same port.
    return 20000 + int(job_id) % 20000 if job_id and job_id.isdigit() else 29500


def map_slurm_env(env: dict[str, str] | None = None) -> bool:
    """Under plain ``srun`` (no torchrun/deepspeed launcher), derive the torch variables from SLURM_*."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", first_node_addr(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID"))))
    return True


def port_in_use(port: int | str) -> UserError:
    return UserError(f"rendezvous port {port} is already in use on this machine (another job, or one still exiting): "
                     "choose a free one with --master-port (the same on every node), or leave --master-port out on one "
                     "node to pick a free one")


def require_free_port(port: int) -> None:
    """Refuse a rendezvous port that a listening socket holds, before starting anything (torchrun would fail with a
    47-line traceback ending in EADDRINUSE). Bound as the rendezvous store binds it: every address, SO_REUSEADDR, so
    a port only in TIME_WAIT counts as free."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            s.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise port_in_use(port) from None
            raise


def is_port_in_use_error(exc: BaseException) -> bool:
    """Whether torch's rendezvous store failed because its port was taken (DistNetworkError, RuntimeError)."""
    text = str(exc)
    return "EADDRINUSE" in text or "address already in use" in text.lower()


def init(timeout_minutes: float = 10) -> str:
    """Join the process group (nccl on GPU, gloo on CPU); returns the device string for this rank.

    ``timeout_minutes`` bounds every collective: a rank that waits for a peer that has failed or hangs gives
    up after minutes, not after the half hour torch defaults to. Failures that one rank sees are sent to the
    others (``agree``, ``on_main``) so that they normally do not wait at all.
    """
    map_slurm_env()
    use_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
    if use_cuda:
        torch.cuda.set_device(cuda_device())
    from .quiet import muted_stdout, name_accelerator

    name_accelerator(use_cuda)
    deepspeed = _import_deepspeed()

    for name in ("RANK", "WORLD_SIZE"):
        os.environ.setdefault(name, "0" if name == "RANK" else "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one process without a launcher: a free port, not a guess another job holds
        os.environ["MASTER_PORT"] = str(free_port() if os.environ["WORLD_SIZE"] == "1" else 29500 + os.getpid() % 1000)
    os.environ.setdefault("LOCAL_RANK", "0")
    if not use_cuda:
        prepare_cpu_comm_op()
    try:
        with muted_stdout():  # DeepSpeed prints "shm_comm_op built successfully" on every rank
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False,
                                       timeout=datetime.timedelta(minutes=timeout_minutes))
    except Exception as exc:
        if is_port_in_use_error(exc):
            raise port_in_use(os.environ["MASTER_PORT"]) from None
        raise
    return f"cuda:{cuda_device()}" if use_cuda else "cpu"


# --------------------------------------------------------------------------------------------------
# DeepSpeed's shared-memory op for CPU collectives, JIT-built by torch.utils.cpp_extension on the first CPU run.
#
# torch guards that build with a FileBaton: a file "lock" in the build folder, created with O_EXCL and removed
# when the build ends. A process killed while it builds leaves the file behind, and every later run waits for
# it to vanish, forever and without a word. So the build runs here first, under a lock of our own that the
# kernel releases when its holder dies (flock): whoever holds it is the only one of us building, so a baton
# found then is stale unless some other program (plain DeepSpeed) has the file open right now.

BUILD_LOCK = "cllama-build.lock"


def prepare_cpu_comm_op() -> None:
    """Build (first run only, announced in one line) or load DeepSpeed's shm op, clearing a stale build lock."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed does not use it here either
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    if installed_ops.get(builder.NAME, False):
        return  # built into the installed package: nothing to build
    folder = Path(_get_build_directory(builder.NAME, verbose=False))
    with _build_lock(folder / BUILD_LOCK, builder.NAME):
        baton = folder / "lock"
        if baton.exists():
            _clear_stale_baton(baton)
        library = folder / f"{builder.NAME}.so"
        sources = [Path(builder.deepspeed_src_path(s)) for s in builder.sources()]
        if not library.exists() or any(s.stat().st_mtime > library.stat().st_mtime for s in sources if s.exists()):
            print(f"note: building DeepSpeed's shared-memory op {builder.NAME} for CPU runs in {folder} (first run "
                  "only, about a minute)", file=sys.stderr, flush=True)
        from .quiet import muted_stdout

        with muted_stdout():
            builder.load(verbose=False)


@contextlib.contextmanager
def _build_lock(path: Path, what: str) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        said, start = False, time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                # The other ranks of this job wait for their sibling's build in silence; anyone else is named.
                if not said and time.monotonic() - start > 5 and not _sibling(holder):
                    print(f"note: waiting for process {holder or '?'} that builds {what} in {path.parent}",
                          file=sys.stderr, flush=True)
                    said = True
                time.sleep(0.2)
            except OSError:  # no flock on this file system: go on without it
                break
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _clear_stale_baton(baton: Path) -> None:
    holders = _processes_holding(baton)
    if holders:  # another program builds there now: wait for it, saying so
        print(f"note: waiting for process {holders[0]} that holds the build lock {baton}", file=sys.stderr, flush=True)
        while baton.exists() and _processes_holding(baton):
            time.sleep(1)
    if baton.exists():
        with contextlib.suppress(FileNotFoundError):
            baton.unlink()
        print(f"note: removed {baton}, a stale lock left by a build that was stopped (no process holds it)",
              file=sys.stderr, flush=True)


def _processes_holding(path: Path) -> list[int]:
    """The processes of this machine (that this user may look at) with ``path`` open: the baton's builder keeps
    its file descriptor open for the whole build."""
    target, found = os.path.realpath(path), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    found.append(int(pid))
                    break
            except OSError:
                continue
    return found


def _sibling(pid: str) -> bool:
    """Whether process ``pid`` was started by our parent (another rank of this job under torchrun/deepspeed)."""
    try:
        return pid.isdigit() and int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getppid()
    except (OSError, IndexError, ValueError):
        return False


def _import_deepspeed():
    """DeepSpeed, imported without the optional mlflow import of its autotuner (deepspeed/autotuning/autotuner.py),
    which this project never runs: where mlflow is installed (the `trackers` and `test` extras) that import was a
    third of every trainer process's DeepSpeed import, 1.5-4 s on a 2-core machine. A run that logs to MLflow
    (logging.trackers) imports mlflow itself, afterwards, as usual."""
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: the autotuner notes it has no mlflow
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def cuda_device(visible: int | None = None) -> int:
    """This process's GPU: its local rank when it sees all of the node's GPUs (torchrun, deepspeed,
    ``srun --gpus-per-node``), device 0 when Slurm bound one GPU to it (``--gpus-per-task=1``: it sees one)."""
    n = torch.cuda.device_count() if visible is None else visible
    r = local_rank()
    if r < n:
        return r
    if n == 1:
        return 0
    raise UserError(f"local rank {r} but this process sees {n} GPUs (CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one process per GPU, with every GPU "
                    "visible or exactly one")


def local_world_size() -> int:
    """Processes on this node (torchrun / deepspeed set LOCAL_WORLD_SIZE; srun sets SLURM_NTASKS_PER_NODE)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _reduce(value: float, op) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=op)
    return float(t.item())


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_true(flag: bool) -> bool:
    """True on every rank when the flag is true on any rank."""
    return _reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0


def mean(value: float) -> float:
    return _reduce(value, dist.ReduceOp.SUM) / world_size()


def total(value: float) -> float:
    return _reduce(value, dist.ReduceOp.SUM)


def minimum(value: float) -> float:
    """The smallest of every rank's ``value`` (e.g. free device memory: a choice all ranks must share)."""
    return _reduce(value, dist.ReduceOp.MIN)


def sum_on_device(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed over all ranks, in place, on their own device: no host synchronisation here (the
    caller reads the result when it needs it: the trainer once per step, docs/hazards.md#h18). On gloo
    (CPU runs) the tensor is on the CPU already; on nccl it lives on this rank's GPU."""
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _control_group():
    """A gloo group for small control messages (errors, results), with a long timeout of its own."""
    global _control
    if _control is None:
        _control = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    return _control


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=_control_group())
    return out


def _raise_agreed(what: str, errors: list[Any], local: BaseException | None) -> None:
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if not failed:
        return
    r, text = failed[0]
    if local is not None and not isinstance(local, UserError):
        raise local  # a bug on this rank: keep its traceback
    where = f" (rank {r} of {len(errors)})" if len(errors) > 1 else ""
    raise UserError(f"{text}{where}") from None


def agree(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it fails on any rank, every rank raises the same error at once.

    Without this, a rank that fails alone (a file missing on its node, say) exits while the others enter
    the next collective and wait for it until the timeout; under plain srun nothing kills them sooner.
    """
    result, local, text = None, None, None
    try:
        result = fn()
    except UserError as exc:
        local, text = exc, str(exc)
    except Exception as exc:  # a bug: every rank stops, the failing one with its traceback
        local, text = exc, f"{what} failed with {type(exc).__name__}: {exc}"
    _raise_agreed(what, _gather(text), local)
    return result  # type: ignore[return-value]


def on_main(what: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result (or its error) to every rank."""
    result, local, text = None, None, None
    if is_main():
        try:
            result = fn()
        except UserError as exc:
            local, text = exc, str(exc)
        except Exception as exc:
            local, text = exc, f"{what} failed on rank 0 with {type(exc).__name__}: {exc}"
    if not dist.is_initialized() or world_size() == 1:
        if local is not None:
            raise local
        return result  # type: ignore[return-value]
    box = [(result, text)]
    dist.broadcast_object_list(box, src=0, group=_control_group())
    result, text = box[0]
    if text:
        if local is not None and not isinstance(local, UserError):
            raise local
        raise UserError(text) from None
    return result  # type: ignore[return-value]


def close() -> None:
    global _control
    if dist.is_initialized():
        dist.destroy_process_group()
    _control = None


class StopFlag:
    """A stop request, read by every rank at a step boundary through ``should_stop``.

    Two ways in: a signal to any rank (SIGINT / SIGTERM / SIGUSR1 / SIGUSR2), or a stop file appearing
    (rank 0 looks): a launcher such as torchrun dies of SIGUSR1 itself, so the batch script traps the
    signal and touches the file instead. A second SIGINT (Ctrl-C twice) stops at once, without saving. A ZeRO-3 save is a collective, so it never runs inside a signal
    handler on one rank, where the other ranks never join it (docs/hazards.md#h7): the handler only
    records, and ranks agree (all-reduce MAX).
    """

    def __init__(self, stop_file: str | os.PathLike | None = None, signals=STOP_SIGNALS):
        self.received: int | None = None
        self._at = 0.0
        self.stop_file = stop_file
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        import time

        # A second Ctrl-C stops at once, without saving. One Ctrl-C can arrive twice within moments (from the
        # terminal, and forwarded by a launcher sharing the process group): only a later one counts.
        if signum == signal.SIGINT and self.received == signal.SIGINT and time.monotonic() - self._at > 2.0:
            raise KeyboardInterrupt
        if self.received is None:
            self.received, self._at = signum, time.monotonic()

    def should_stop(self) -> bool:
        local = self.received is not None
        if self.stop_file is not None and rank() == 0:
            local = local or os.path.exists(self.stop_file)
        return any_true(local)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

