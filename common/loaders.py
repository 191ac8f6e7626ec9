"""Data loaders whose order and randomness are functions of ``(seed, epoch, rank)`` only, for
every pipeline: a resumed run and one never interrupted see the same batches and the same
augmentations.

:func:`build_loader` makes the DataLoader (a sharded sampler across processes; worker seeds
from a generator reseeded each epoch); :func:`set_loader_epoch` prepares a loader, or any
batch source with ``set_epoch`` (the decathlon's device loader), for the next epoch.
"""
from __future__ import annotations

from typing import Optional

from torch.utils.data import DataLoader, Dataset

from common.distributed import DistInfo, make_sampler
from common.errors import UsageError
from common.seed import epoch_generator, reseed_loader, worker_init_fn

__all__ = ["build_loader", "set_loader_epoch"]


def build_loader(dataset: Dataset, *, batch_size: int, train: bool, workers: int = 0,
                 dist_info: Optional[DistInfo] = None, seed: int = 0, pin_memory: bool = False,
                 drop_last: bool = False, collate_fn=None) -> DataLoader:
    """A DataLoader whose order and worker seeds depend on ``(seed, epoch, rank)`` only (call
    :func:`set_loader_epoch` before each epoch); distributed runs shard it. ``drop_last``
    drops a last incomplete training batch when there is a complete one."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    rank = dist_info.rank if dist_info is not None else 0
    world = dist_info.world_size if dist_info is not None else 1
    loader = DataLoader(dataset, batch_size=batch_size, sampler=make_sampler(dataset, dist_info, train, seed),
                        num_workers=workers, pin_memory=pin_memory,
                        drop_last=bool(drop_last and train and len(dataset) >= batch_size * world),
                        generator=epoch_generator(seed, 0, rank), worker_init_fn=worker_init_fn,
                        persistent_workers=False, collate_fn=collate_fn)  # workers must see set_epoch's value
    loader.seed_and_rank = (int(seed), rank)
    return loader


def set_loader_epoch(loader, epoch: int) -> None:
    """Prepare ``loader`` for ``epoch``: sampler order, worker seeds (for transforms that use
    the global generators) and the dataset's per-sample augmentation seed. A batch source
    that is not a DataLoader is asked to ``set_epoch`` itself."""
    if not isinstance(loader, DataLoader):
        loader.set_epoch(epoch)
        return
    seed, rank = getattr(loader, "seed_and_rank", (0, 0))
    if loader.generator is not None:
        reseed_loader(loader, seed, epoch, rank)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
