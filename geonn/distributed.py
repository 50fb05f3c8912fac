"""Running under ``torchrun``: process group, ranks, devices, and sharding of global batches.

geonn uses ``torch.distributed`` as it is and adds nothing home-made: ``torchrun`` starts the
processes and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`setup` joins the process group (``nccl`` for CUDA devices, ``gloo`` on CPUs) the first time a
training entry point needs it. Outside ``torchrun`` everything here is a no-op: rank 0 of 1.

The conventions every entry point follows:

- the global batch of ``B`` samples (the same on every rank: shuffles use one seeded generator)
  is sharded ``batch[rank::world]``, each rank's loss is its share of the global mean, and
  :class:`torch.nn.parallel.DistributedDataParallel` all-reduces the gradients, so a run on N
  processes equals one process with the same global batch up to floating-point summation order;
- rank 0 alone writes files (checkpoints, outputs) and shows progress bars; the others wait at a
  barrier and read rank 0's checkpoint on resume.

Example (one node, two processes on CPU)::

    torchrun --nproc-per-node 2 -m geonn case lorenz63 --out runs/lorenz63-ddp
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Context:
    """Where this process stands: ``rank`` of ``world`` processes, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"`` (the local rank's GPU).

    Raises:
        InputError: an unknown name, or ``"cuda"`` on a machine without a usable GPU.
    """
    if isinstance(device, torch.device):
        return device
    device = "auto" if device is None else device
    if device not in DEVICES:
        raise InputError(f"device: expected one of {DEVICES}, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device: 'cuda' was asked for, but torch sees no CUDA GPU here (use 'cpu' or 'auto')")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name}: expected an integer environment variable (set by torchrun), got {value!r}") from None


def setup(device: str | torch.device | None = "auto") -> Context:
    """Join the process group if this process was started by ``torchrun`` with more than one process.

    Safe to call many times. The backend is ``nccl`` when the device is CUDA, else ``gloo``.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    resolved = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return Context(rank=rank, world=world, local_rank=local_rank, device=resolved)


def current() -> Context:
    """The context of an already set-up run (rank 0 of 1 outside ``torchrun``)."""
    if not dist.is_initialized():
        return Context()
    return Context(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", 0),
                   device=resolve_device("cuda" if dist.get_backend() == "nccl" else "cpu", _env_int("LOCAL_RANK", 0)))


def is_main() -> bool:
    return current().is_main


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value, source: int = 0):
    """``value`` from rank ``source`` on every rank (pickled by torch.distributed within the group)."""
    if not dist.is_initialized():
        return value
    box = [value if dist.get_rank() == source else None]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks (a new tensor; ``value`` itself is unchanged)."""
    if not dist.is_initialized():
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def shard(indices: torch.Tensor, context: Context) -> torch.Tensor:
    """This rank's part of a global batch of sample indices: ``indices[rank::world]``."""
    return indices[context.rank :: context.world]
