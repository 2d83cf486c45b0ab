"""Several processes training one model: torchrun, DistributedDataParallel, and who writes.

``torchrun`` starts N copies of a command and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). Every process reads the same data and builds the
same batches; at each optimizer step each one computes the gradients of its share of that step's examples,
DistributedDataParallel (DDP) averages them, and every process takes the same optimizer step. Rank 0 alone logs,
shows progress and writes files. This module is the one place that knows about ranks.

A process started without torchrun is a world of one: nothing here then communicates or changes anything.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import signal
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .device import pick_device
from .errors import UserInputError

BACKENDS = ("auto", "gloo", "nccl")


class OtherRankFailed(Exception):
    """This process stops because another one failed (and reports why): exit quietly with ``exit_code``."""

    def __init__(self, exit_code: int):
        super().__init__(f"another process failed (exit status {exit_code})")
        self.exit_code = exit_code


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun): who reports a bad flag."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def launched() -> bool:
    """True when torchrun (or another launcher that sets ``WORLD_SIZE``) started more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@dataclass
class World:
    """The processes training together, and this one's place among them (a world of one by default)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    agreed: bool = False  # set once every process has got through set-up (see ready)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def rows(self, n_rows: int) -> range:
        """This process's rows of a batch of ``n_rows`` examples: every ``size``-th, from its rank.

        Interleaved rather than in blocks, so each process gets short and long examples alike (batches are
        grouped by length) and none waits long for the others."""
        return range(self.rank, n_rows, self.size)

    def sum(self, values: list[float]) -> list[float]:
        """``values`` added up over all processes (the values themselves in a world of one)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def ready(self) -> None:
        """Called by every process when its set-up is done, before training starts. If another process failed
        in set-up, this one stops quietly (that one reports the error): see :func:`session`."""
        if self.distributed and not self.agreed:
            first_failed = self._first_failed(failed=False)
            self.agreed = True
            if first_failed is not None:
                raise OtherRankFailed(2)

    def check_same(self, what: str, value: int) -> None:
        """Refuse to go on unless every process has the same ``value`` (a fingerprint of ``what``): on several
        machines, each reads its own copy of the data, and copies that differ would train on a mixture."""
        if not self.distributed:
            return
        values = torch.tensor([value, -value], dtype=torch.int64, device=self._collective_device)
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
        if int(values[0]) != -int(values[1]):
            raise UserInputError(f"the {self.size} processes read different {what}: every machine must have the "
                                 "same data and checkpoint files (the same bytes at the same paths)")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in DistributedDataParallel, which averages its gradients over the processes; as it is
        in a world of one."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def check_batch_size(self, batch_size: int) -> None:
        """A step's examples are shared among the processes: fewer examples than processes leaves some idle."""
        if batch_size < self.size:
            raise UserInputError(f"--batch-size {batch_size}: fewer examples per step than the {self.size} "
                                 f"processes that share them; give --batch-size {self.size} or more, or start "
                                 "fewer processes")

    @property
    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _first_failed(self, failed: bool) -> int | None:
        """The lowest rank that failed in set-up, or None when none did (every process must call this)."""
        flag = torch.tensor([self.rank if failed else self.size], device=self._collective_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        first = int(flag.item())
        return None if first >= self.size else first


def rank_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """The device of the process with ``local_rank`` on its machine: its own GPU when there are GPUs."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise UserInputError(f"process {local_rank} of this machine has no GPU of its own: the machine has "
                                 f"{torch.cuda.device_count()}; start at most that many (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    if requested == "auto":
        return torch.device("cpu")  # DDP has no backend for Apple's MPS
    device = pick_device(requested)
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"--device {requested}: training with several processes runs on CPUs (gloo) or "
                             "CUDA GPUs (nccl) only; use --device cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def pick_backend(backend: str, device: torch.device) -> str:
    """nccl for CUDA GPUs, gloo for CPUs, unless ``backend`` names one."""
    if backend not in BACKENDS:
        raise UserInputError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserInputError("--backend nccl: nccl runs on CUDA GPUs only; use gloo (the default on CPUs)")
    return backend


@contextlib.contextmanager
def session(device: str = "auto", backend: str = "auto", timeout_minutes: float = 30):
    """The :class:`World` of this process for the length of a run; sets up and shuts down torch.distributed.

    Started by torchrun, the processes join one group (gloo on CPUs, nccl on GPUs) and each gets its device. An
    error in set-up (a bad file, an existing output) happens in every process, or in some: the processes agree
    on the lowest rank that failed, which reports it, while the others stop quietly (:class:`OtherRankFailed`).
    After set-up, an error that every process meets alike (training diverged) is reported by rank 0 alone, and a
    process whose peer went away in the middle of a collective stops quietly: the peer reports why.
    Without torchrun, the world is this process alone and the block runs as it is.
    """
    if not launched():
        yield World(device=pick_device(device))
        return
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_device = rank_device(device, local_rank)
    chosen = pick_backend(backend, world_device)
    dist.init_process_group(chosen, rank=rank, world_size=size, timeout=datetime.timedelta(minutes=timeout_minutes))
    world = World(device=world_device, rank=rank, size=size, local_rank=local_rank)
    finished = False
    try:
        yield world
        finished = True
    except OtherRankFailed:
        raise
    except BaseException as exc:
        _hold_sigterm()
        if not world.agreed:  # failed in set-up: the others learn it at their ready(), or here if they failed too
            world.agreed = True
            first_failed = _first_failed_or_none(world)
            if first_failed is not None and first_failed != world.rank:
                raise OtherRankFailed(_exit_code(exc)) from None
        elif peer_gone(exc):
            raise OtherRankFailed(1) from None  # the process that went away says why (or torchrun does)
        elif not world.is_main and isinstance(exc, (UserInputError, KeyboardInterrupt)):
            raise OtherRankFailed(_exit_code(exc)) from None  # rank 0 met the same and reports it
        raise
    finally:
        shutdown(wait_for_others=finished)


# what gloo says when the process at the other end of a collective has gone (nccl raises DistError and subclasses)
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker")


def peer_gone(exc: BaseException) -> bool:
    """Whether ``exc`` says only that another process stopped talking, in the middle of a collective: a
    consequence of that process's failure, which it reports itself."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in PEER_GONE)


def _hold_sigterm() -> None:
    """A failing process is about to stop, and one of the failing processes reports why: let SIGTERM not cut that
    short. When the first of them exits, torchrun sends SIGTERM to the others, which could otherwise kill the one
    that reports between here and its message (torchrun still sends SIGKILL after its grace period, should a
    process hang)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _first_failed_or_none(world: World) -> int | None:
    try:
        return world._first_failed(failed=True)
    except Exception:  # noqa: BLE001 - the others are gone (killed by torchrun): report our own error
        return world.rank


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, UserInputError):
        return 2
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


def shutdown(wait_for_others: bool = True) -> None:
    """Leave the process group. Every DistributedDataParallel wrapper must be gone first: a 2-process gloo run
    that destroys the group while one is still alive can abort at exit ("terminate called without an active
    exception"), so collect it, wait for the others, then destroy."""
    if not dist.is_initialized():
        return
    gc.collect()
    with contextlib.suppress(Exception):  # a peer that has already gone cannot be waited for
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
