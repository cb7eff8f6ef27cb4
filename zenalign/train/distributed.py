"""Process-group plumbing for runs started by ``torchrun`` or the ``deepspeed`` launcher.

zenalign has no launcher of its own: it reads RANK, WORLD_SIZE and LOCAL_RANK from the
environment the launcher sets, joins the process group (gloo on CPU, nccl on GPU), and offers the
few collectives the trainer needs. A plain ``zenalign run`` is a world of one and starts no
process group unless DeepSpeed asks for one.
"""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from zenalign.errors import DistributedError, RecipeError, one_line


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """DeepSpeed always wants a process group; give a lone process the variables a launcher would."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))


def prepare_deepspeed_env(device_type: Optional[str] = None) -> None:
    """Environment DeepSpeed reads when it first picks its accelerator: that of the run's device
    (``engine.device`` resolved, ``"cuda"`` or ``"cpu"``), not DeepSpeed's own guess, which is CUDA
    wherever a GPU is visible, also for a run on the CPU. Before the device is known (the CLI's
    start), the CPU where no GPU is visible. A DS_ACCELERATOR set by hand is kept (and checked
    against the device by :func:`check_deepspeed_accelerator`)."""
    if device_type is not None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    elif not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.expanduser("~"), ".cache", "zenalign", "torch_extensions"))


@dataclass
class Dist:
    """This process's place in the run and the collectives the trainer uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every rank along dim 0, in rank order."""
        if not self.active:
            return tensor
        device = _collective_device(tensor)
        parts = [torch.empty_like(tensor, device=device) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.to(device).contiguous())
        return torch.cat(parts).to(tensor.device)

    def sum(self, values: list[float]) -> list[float]:
        """Sum a list of floats over ranks."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device(torch.empty(0)))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=_collective_device(torch.empty(0)))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def gather_objects(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank."""
        if not self.active:
            return list(items)
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, list(items))
        return [item for part in parts for item in part]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's Python object, on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# What gloo and NCCL say when a peer is gone or a collective waited too long
_PEER_FAILURES = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe",
                  "nccl communicator was aborted", "received data size doesn't match")


def collective_failure(exc: BaseException, dist_: Dist, timeout_s: float) -> Optional[DistributedError]:
    """A one-line error for a collective that failed because another process stopped, hung or died
    (None when ``exc`` is something else, or the run has one process)."""
    text = one_line(exc).lower()
    if not dist_.active or not any(marker in text for marker in _PEER_FAILURES):
        return None
    return DistributedError(
        f"rank {dist_.rank} of {dist_.world_size}: a collective operation failed after waiting up to "
        f"engine.collective_timeout_s ({timeout_s:g} s), so another process stopped, hung or died "
        f"({one_line(exc)[:160]}); its own log says why; the newest checkpoint is intact: --resume auto")


def _collective_device(tensor: torch.Tensor) -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_deepspeed_accelerator(device_type: str) -> None:
    """DeepSpeed picks its accelerator once per process; a run whose device is not that
    accelerator's would have DeepSpeed move its tensors elsewhere. One line instead."""
    from deepspeed.accelerator import get_accelerator

    chosen = get_accelerator().device_name()
    if chosen != device_type:
        raise RecipeError(f"engine.backend deepspeed: DeepSpeed's accelerator is {chosen!r} but engine.device is "
                          f"{device_type!r} (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', 'unset')}); set "
                          f"DS_ACCELERATOR={device_type} before DeepSpeed starts, or engine.device: {chosen}")


def leave_process_group() -> None:
    """Destroy the default process group, as PyTorch asks of every process before it exits: left
    to the interpreter's teardown, gloo's worker threads can be destroyed after Python is (SIGABRT,
    "terminate called without an active exception"), and a launcher then reports a finished run
    as failed. ``zenalign run`` calls this at exit (``atexit``), after a run that ended well: a
    failed one skips it, as another process may still be inside a collective, and earlier would
    leave DeepSpeed's cached groups pointing at a destroyed one. The wrappers that hold the group
    (DDP, a DeepSpeed engine) are collected first."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def init_distributed(backend: str, timeout_s: float = 600.0, device_type: Optional[str] = None) -> Dist:
    """Join the launcher's process group (if any). ``backend`` is the recipe's engine backend;
    ``timeout_s`` bounds every collective, so a rank that stops or hangs ends the job instead of
    leaving the others waiting (gloo's own default is 30 minutes). ``device_type`` is where the
    run's models live (``"cuda"``: NCCL, and each rank on its local GPU; ``"cpu"``: gloo; None:
    CUDA wherever torch sees it), and so DeepSpeed's accelerator."""
    timeout = timedelta(seconds=timeout_s)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    group_backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "deepspeed":
        prepare_deepspeed_env(device_type)
        single_process_env()
        import deepspeed

        check_deepspeed_accelerator(device_type)
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend=group_backend, timeout=timeout)
    elif launched_world_size() > 1 and not dist.is_initialized():
        dist.init_process_group(backend=group_backend, timeout=timeout)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return Dist(rank=rank, world_size=world, local_rank=local)
