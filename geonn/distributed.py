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
  barrier and read rank 0's checkpoint on resume (:func:`resume_state`, :func:`save_on_main`,
  :func:`show_progress`);
- training loops that are not one module's forward pass (objectives with several terms,
  gradients rescaled term by term, clipping) weigh each rank's mean loss by its share of the
  global batch (:func:`share`) and sum the gradients over ranks (:func:`all_reduce_gradients`):
  the same all-reduce DistributedDataParallel does, done after ``backward``;
- estimators whose unknowns are a set of independent windows (:func:`geonn.joint.estimate_jointly`)
  shard the windows and sum their normal equations over ranks; those whose unknowns are one
  whole trajectory run replicated: the same computation on every rank, rank 0 writing.

Example (one node, two processes on CPU)::

    torchrun --nproc-per-node 2 -m geonn case lorenz63 --out runs/lorenz63-ddp
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import InputError
from .io import load_checkpoint, remove_temporaries, save_checkpoint

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


def _wire() -> torch.device:
    """Where the backend reduces tensors: the local GPU for nccl, the CPU for gloo."""
    return current().device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over ranks (a new tensor on ``value``'s device; ``value`` itself is unchanged)."""
    if not dist.is_initialized():
        return value
    total = value.detach().to(_wire(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(value.device)


def shard(indices: torch.Tensor, context: Context) -> torch.Tensor:
    """This rank's part of a global batch of sample indices: ``indices[rank::world]``."""
    return indices[context.rank :: context.world]


def share(local: int, total: int) -> float:
    """The weight of a rank's mean over ``local`` samples in the mean over the ``total`` of the global batch."""
    return local / total if total else 0.0


def all_reduce_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sums over ranks of ``tensors`` (new tensors, each on its own device; one all-reduce per dtype).

    Outside ``torchrun`` the tensors themselves are returned.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1 or not tensors:
        return list(tensors)
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    summed: list[torch.Tensor | None] = [None] * len(tensors)
    for members in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in members]).to(_wire())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for i, chunk in zip(members, flat.split([tensors[i].numel() for i in members])):
            summed[i] = chunk.reshape(tensors[i].shape).to(tensors[i].device, copy=True)
    return summed


def all_reduce_gradients(parameters: list[torch.Tensor]) -> None:
    """Replace every parameter's ``.grad`` by its sum over ranks (a missing gradient counts as zero).

    With each rank's loss weighted by its :func:`share` of the global batch, the sum is the
    gradient of the global batch's loss. A no-op outside ``torchrun``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in parameters]
    for p, g in zip(parameters, all_reduce_tensors(grads)):
        p.grad = g


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over ranks (a float; unchanged outside ``torchrun``)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = torch.tensor([value], dtype=torch.float64, device=_wire())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return float(box)


def all_gather(value) -> list:
    """``[value of rank 0, value of rank 1, ...]`` on every rank (any picklable value, e.g. tensors of
    different sizes); ``[value]`` outside ``torchrun``."""
    if not dist.is_initialized():
        return [value]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble a tensor whose first dimension (``total`` long) was sharded ``[rank::world]``.

    Every rank passes its shard and gets the whole tensor (on ``local``'s device); outside
    ``torchrun`` ``local`` itself is returned.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    parts = all_gather(local.detach().cpu())
    whole = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
    for rank, part in enumerate(parts):
        whole[rank::len(parts)] = part
    return whole.to(local.device)


def show_progress(progress: bool) -> bool:
    """Whether this process shows progress bars: asked for, and rank 0."""
    return bool(progress) and is_main()


def resume_state(path: str | os.PathLike | None, resume: bool) -> dict | None:
    """The checkpoint to resume from, the same on every rank: rank 0 reads ``path`` and broadcasts it.

    Rank 0 first removes what a run killed while writing its checkpoint left behind. ``None``
    when not resuming or when rank 0 finds no checkpoint (then every rank starts afresh). Every
    rank must call this (it is a collective call under ``torchrun`` when ``resume``).
    """
    main = is_main()
    state = None
    if path is not None and main:
        remove_temporaries(path)
        if resume and os.path.isfile(path):
            state = load_checkpoint(path)
    if resume and dist.is_initialized():
        state = broadcast_object(state)
    return state


def save_on_main(state: dict, path: str | os.PathLike | None, save=None) -> None:
    """Rank 0 writes ``state`` to ``path`` atomically (none when ``path`` is None); every rank then
    waits at a barrier, so none runs ahead of the last complete checkpoint.

    ``save``: the writer, :func:`geonn.io.save_checkpoint` by default (a caller passes its own
    module's name for it, so that tests can stand in for it there).
    """
    if path is not None and is_main():
        (save or save_checkpoint)(state, path)
    barrier()
