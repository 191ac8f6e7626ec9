"""Train and val loaders of a decathlon task for ``decathlon.train`` and ``decathlon.pretrain``:
DataLoader workers decoding and augmenting on the CPU, or batches augmented on the device
(:mod:`decathlon.device_loader`), as ``--loader`` says."""
from __future__ import annotations

from common.amp import resolve_switch
from common.distributed import DistInfo, barrier, make_sampler
from common.loaders import build_loader
from decathlon.data import DecathlonDataset, build_transforms
from decathlon.device_loader import DeviceBatches, SquareImages, images_fit_on_device

__all__ = ["make_loaders", "use_device_loader", "device_loaders"]


def make_loaders(cfg, task: str, train_split: str, dist: DistInfo, preprocess: str = "square"):
    """Train and val loaders of ``task`` under ``preprocess`` (the resolved ``--preprocess``);
    rank 0 builds first so that it alone creates the decoded-image cache files."""
    hflip = None if cfg.hflip == "auto" else cfg.hflip == "on"
    tf = dict(resize=cfg.resize, crop=cfg.crop, preprocess=preprocess)

    def build():
        tr = DecathlonDataset(cfg.data_root, task, train_split, cache_dir=cfg.cache_dir,
                              seed=cfg.seed, transform=build_transforms(
                                  task, True, hflip=hflip, scale=tuple(cfg.scale), **tf))
        va = DecathlonDataset(cfg.data_root, task, "val", cache_dir=cfg.cache_dir,
                              transform=build_transforms(task, False, **tf))
        return tr, va

    if not dist.is_main:
        barrier()
    train_set, val_set = build()
    if dist.is_main:
        barrier()
    if use_device_loader(cfg, dist, preprocess):
        return device_loaders(cfg, train_set, val_set, dist, hflip)
    pin = dist.device.type == "cuda"
    common = dict(batch_size=cfg.batch_size, workers=cfg.loader_workers, dist_info=dist,
                  seed=cfg.seed, pin_memory=pin)
    return build_loader(train_set, train=True, **common), build_loader(val_set, train=False, **common)


def use_device_loader(cfg, dist: DistInfo, preprocess: str = "square") -> bool:
    """``--loader``: auto = the device loader on CUDA when the images are squares
    (``--preprocess square``) and no random rescaling is asked for."""
    if cfg.loader != "auto":
        return cfg.loader == "device"
    return dist.device.type == "cuda" and tuple(cfg.scale) == (1.0, 1.0) and preprocess == "square"


def device_loaders(cfg, train_set, val_set, dist: DistInfo, hflip):
    """Train and val batches augmented on the device (decathlon.device_loader); rank 0 fills
    the square-image arrays first."""
    spec = train_set.spec

    def square(ds):
        plain = DecathlonDataset(cfg.data_root, ds.task, ds.split, cache_dir=cfg.cache_dir)
        return SquareImages(plain, cfg.resize, cache_dir=cfg.cache_dir, workers=cfg.loader_workers,
                            log=print if dist.is_main else (lambda *_: None))

    if not dist.is_main:
        barrier()
    images = square(train_set), square(val_set)
    if dist.is_main:
        barrier()
    resident = resolve_switch(cfg.images_on_device, images_fit_on_device(images, dist.device))
    if resident and dist.is_main:
        size = sum(im.nbytes for im in images) / 2 ** 20
        print(f"{train_set.task}: the square images ({size:.0f} MiB) are kept on {dist.device}")
    common = dict(batch_size=cfg.batch_size, crop=cfg.crop, mean=spec.mean, std=spec.std, device=dist.device,
                  seed=cfg.seed, rank=dist.rank, resident=resident)
    flips = spec.hflip if hflip is None else hflip
    return (DeviceBatches(images[0], train_set, train=True, hflip=flips,
                          sampler=make_sampler(train_set, dist, shuffle=True, seed=cfg.seed), **common),
            DeviceBatches(images[1], val_set, train=False, hflip=False,
                          sampler=make_sampler(val_set, dist, shuffle=False, seed=cfg.seed), **common))
