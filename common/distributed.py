"""Process-group set-up, DDP wrapping and data sampling shared by both pipelines.

A run started by ``torchrun`` finds ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its
environment and joins a process group (gloo on CPU, nccl on CUDA); a run started with
plain ``python -m ...`` is a single process and every collective here is a no-op, so the
training loops call them unconditionally.

Samplers: ``DistributedSampler`` for training (one replica in a single process), whose
permutation comes from a generator seeded by ``(seed, epoch)`` only, so a run resumed at
epoch E sees the same order of examples as a run that was never interrupted, and one
process sees the order of many processes taken together.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sized

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DistributedSampler, Sampler

from common.errors import UsageError

__all__ = [
    "DistInfo", "init_distributed", "is_dist", "all_reduce_sum", "all_reduce_max", "gather_object",
    "barrier", "cleanup", "wrap_ddp", "unwrap", "make_sampler", "ShardSampler",
]

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True
    distributed: bool = False


def is_dist() -> bool:
    """True when a process group is initialised and has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer "
                         f"(expected the value torchrun sets)") from None


def init_distributed(device: str = "auto", *, threads: Optional[int] = None,
                     workers: Optional[int] = None) -> DistInfo:
    """Join torchrun's process group if one was launched, else describe a single process.

    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun with CUDA
    each process takes ``cuda:LOCAL_RANK`` (an explicit index is overridden, since every
    rank receives the same command line). torch's CPU threads are set so that they and the
    loader ``workers`` fit the cores this process may use (:func:`common.cli.apply_threads`;
    ``threads`` overrides).
    """
    # Imported here so that common.cli can import this module's siblings freely.
    from common.cli import apply_threads, resolve_device

    apply_threads(threads, workers)

    present = [k for k in _ENV_KEYS if k in os.environ]
    if not present:
        return DistInfo(device=resolve_device(device))
    if len(present) != len(_ENV_KEYS):
        missing = sorted(set(_ENV_KEYS) - set(present))
        raise UsageError(f"incomplete torchrun environment: {present} set but {missing} "
                           f"missing; launch with torchrun or unset them")
    rank, world_size, local_rank = (_env_int(k) for k in _ENV_KEYS)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"RANK={rank} / WORLD_SIZE={world_size} is not a valid rank assignment")

    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size == 1:
        # torchrun --nproc_per_node=1: nothing to synchronise with.
        return DistInfo(rank, 1, local_rank, dev, True, False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        try:
            dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                    world_size=world_size, **kwargs)
        except TypeError:  # torch without the device_id keyword
            dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                    world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev, rank == 0, True)


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not is_dist():
        return tensor
    # gloo reduces CPU tensors, nccl CUDA ones: work on a copy on the group's device
    # when needed and write the result back.
    work = tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        work = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    elif dist.get_backend() == "gloo" and tensor.device.type != "cpu":
        work = tensor.cpu()
    dist.all_reduce(work, op=op)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it (no-op for one process)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over all processes, in place (no-op for one)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def gather_object(obj: Any, dst: int = 0) -> Optional[List[Any]]:
    """``[obj of rank 0, obj of rank 1, ...]`` on rank ``dst`` and None elsewhere; call
    on every rank. One process: ``[obj]``. Objects are pickled (e.g. RNG states)."""
    if not is_dist():
        return [obj]
    rank = dist.get_rank()
    out = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel when the run is distributed.

    A piggybacked model has frozen backbone weights; DDP only registers parameters with
    ``requires_grad=True``, so ``find_unused_parameters=False`` holds as long as every
    trainable parameter (the masks, the new head) is used in each forward pass.
    """
    if not info.distributed:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise UsageError("wrap_ddp: the model has no trainable parameters; "
                         "nothing for DistributedDataParallel to synchronise")
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class ShardSampler(DistributedSampler):
    """Evaluation sampler for a distributed run: rank r takes examples r, r+W, r+2W, ...

    Unlike ``DistributedSampler`` it never pads by repeating examples, so counts summed
    over ranks (accuracy, the confusion matrix) cover every example exactly once. Ranks
    may then run a different number of batches, which is fine for a forward-only loop
    over the unwrapped model.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


def make_sampler(dataset: Sized, info: Optional[DistInfo], shuffle: bool, seed: int) -> Sampler:
    """The sampler for a training (``shuffle=True``) or evaluation (``shuffle=False``) set.

    Distributed: ``DistributedSampler`` for training, :class:`ShardSampler` (a
    ``DistributedSampler`` without padding) for evaluation. One process:
    ``DistributedSampler`` of one replica, whose order is a function of ``(seed, epoch)``
    only, the same rule as across processes. Every returned sampler has ``set_epoch``.
    """
    if info is not None and info.distributed:
        if not shuffle:
            return ShardSampler(dataset, num_replicas=info.world_size, rank=info.rank)
        return DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                  shuffle=True, seed=seed)
    return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed)
