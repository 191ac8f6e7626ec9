"""Seeding of every random-number generator a run touches.

``seed_everything`` seeds python ``random``, numpy and torch (CPU and CUDA) in the main
process. DataLoader workers get their own torch seed from the loader (``base_seed +
worker_id``, where ``base_seed`` is drawn from the loader's ``generator`` when each
epoch's iterator is created); :func:`worker_init_fn` derives numpy's and python's seeds
from it, so augmentation in workers is a function of the loader's generator.
:func:`epoch_generator` gives that generator a seed that depends only on
``(seed, epoch, rank)``, which is what makes a resumed run see the same augmentations
as an uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Optional

import numpy as np
import torch

from common.errors import UsageError

__all__ = ["seed_everything", "worker_init_fn", "epoch_seed", "epoch_generator",
           "reseed_loader"]

_MASK64 = (1 << 63) - 1


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch with ``seed + rank``; returns the seed used.

    Ranks get different seeds so that their random augmentations differ; model
    initialisation that must agree across ranks is synchronised by DDP's broadcast.
    """
    value = int(seed) + int(rank)
    if value < 0:
        raise UsageError(f"seed + rank must be >= 0, got {seed} + {rank}")
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # also seeds every CUDA device
    return value


def worker_init_fn(worker_id: int) -> None:
    """Seed numpy and python ``random`` in a DataLoader worker from torch's worker seed."""
    seed = torch.initial_seed()  # base_seed + worker_id, set by the DataLoader
    # SeedSequence spreads nearby integers (consecutive worker ids) into unrelated states.
    np.random.seed(np.random.SeedSequence(seed).generate_state(4))
    random.seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed that depends only on ``(seed, epoch, rank)``."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(2, np.uint64)
    return int(state[0]) & _MASK64


def epoch_generator(seed: int, epoch: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`epoch_seed`."""
    g = torch.Generator()
    g.manual_seed(epoch_seed(seed, epoch, rank))
    return g


def reseed_loader(loader: torch.utils.data.DataLoader, seed: int, epoch: int,
                  rank: int = 0) -> None:
    """Prepare ``loader`` for ``epoch``: sampler ``set_epoch`` and generator reseed.

    The loader must have been built with ``generator=epoch_generator(...)`` (and without
    persistent workers, whose seeds are fixed once) for the worker seeds to follow.
    """
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    if inner is not sampler and hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)
    generator: Optional[torch.Generator] = getattr(loader, "generator", None)
    if generator is None:
        raise ValueError("reseed_loader: the DataLoader has no generator; build it with "
                         "generator=common.seed.epoch_generator(seed)")
    if getattr(loader, "persistent_workers", False):
        raise ValueError("reseed_loader: persistent_workers=True keeps worker seeds from the "
                         "first epoch; build the loader with persistent_workers=False")
    generator.manual_seed(epoch_seed(seed, epoch, rank))
