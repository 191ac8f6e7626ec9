"""Batches that keep a GPU fed: square-resized images in one uint8 array, augmented on the device.

The paper's decathlon augmentation resizes every image to a ``resize`` px square, then
takes a random ``crop`` px window and (per task) flips it. The resize does not depend on
the random draw, so it is done once: :class:`SquareImages` holds every image of a split
already resized, as one ``(N, resize, resize, 3)`` uint8 array (memory-mapped under
``--cache-dir``, filled once by parallel workers, refilled only when the annotation
file changes). :class:`DeviceBatches` then serves batches: a background thread gathers
each batch's uint8 pixels into pinned memory, the copy to the device runs asynchronously,
and crop, flip, conversion and normalisation run there as a few batched kernels. Nothing
is decoded or resized per epoch, and the host does one small gather per batch.

The pixels are exactly those of :class:`decathlon.transforms.DecathlonTransform` (same
resize); evaluation batches are identical to the worker loader's. Random crops and flips
are drawn per batch from a generator seeded by ``(seed, epoch, rank)``, so a resumed run
sees the same augmentation as an uninterrupted one. Random rescaling (``--scale``) is
not done here; the worker loader serves it.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.seed import epoch_seed

__all__ = ["SquareImages", "DeviceBatches", "augment_on_device"]


class _Resized(Dataset):
    """(index, square uint8 image) for the one-time fill, decoded by loader workers."""

    def __init__(self, dataset, size: int, indices: np.ndarray):
        from decathlon.transforms import DecathlonTransform
        self.dataset, self.size, self.indices = dataset, size, indices
        self._square = DecathlonTransform((0, 0, 0), (1, 1, 1), train=False, resize=size, crop=size)._square

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        return index, torch.from_numpy(np.ascontiguousarray(self._square(self.dataset.load(index), self.size)))


class SquareImages:
    """Every image of ``dataset`` resized to ``size`` x ``size``: a (N, size, size, 3) uint8 array."""

    def __init__(self, dataset, size: int, cache_dir: Optional[Path] = None, workers: int = 0,
                 log=print):
        self.size = int(size)
        n = len(dataset)
        names = b"\0".join(p.ann_file.name.encode() + b"\0" + b"\0".join(p.file_names.tolist())
                           for p in dataset.parts)
        fingerprint = hashlib.blake2b(names, digest_size=16).hexdigest()
        shape = (n, self.size, self.size, 3)
        if cache_dir is None:
            self.pixels = np.empty(shape, dtype=np.uint8)
            filled = np.zeros(n, dtype=bool)
        else:
            base = Path(cache_dir) / f"{dataset.task}_{dataset.split.replace('+', '_')}_square{self.size}"
            pixels, flags, meta_path = (base.with_suffix(".u8"), base.with_suffix(".filled"),
                                        base.with_suffix(".json"))
            meta = {"images": n, "size": self.size, "fingerprint": fingerprint}
            base.parent.mkdir(parents=True, exist_ok=True)
            try:
                current = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                current = None
            if current != meta:
                for path, nbytes in ((pixels, int(np.prod(shape))), (flags, n)):
                    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                    with open(tmp, "wb") as f:
                        f.truncate(max(1, nbytes))
                    os.replace(tmp, path)
                tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(meta))
                os.replace(tmp, meta_path)
            self.pixels = np.memmap(pixels, dtype=np.uint8, mode="r+", shape=shape)
            filled = np.memmap(flags, dtype=np.uint8, mode="r+", shape=(n,))
        todo = np.flatnonzero(np.asarray(filled) == 0)
        if len(todo):
            log(f"resizing {len(todo)} {dataset.task} {dataset.split} images to {self.size} px once "
                f"({workers} workers)")
            loader = DataLoader(_Resized(dataset, self.size, todo), batch_size=64, num_workers=workers,
                                shuffle=False)
            for index, images in loader:
                idx = index.numpy()
                self.pixels[idx] = images.numpy()
                filled[idx] = 1  # after the pixels: an interrupted fill never marks a partial image
            if isinstance(self.pixels, np.memmap):
                self.pixels.flush()
                filled.flush()

    def __len__(self) -> int:
        return len(self.pixels)

    def gather(self, indices: np.ndarray, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The uint8 pixels of ``indices`` as a (B, S, S, 3) tensor (into ``out`` when given)."""
        batch = torch.from_numpy(self.pixels[indices])
        if out is None:
            return batch
        out[: len(indices)].copy_(batch)
        return out[: len(indices)]


def augment_on_device(pixels: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, flips: torch.Tensor,
                      crop: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, crop, crop): a ``crop`` window at
    (tops, lefts) per image, mirrored where ``flips``, then ``(x - 255 mean) / (255 std)``."""
    b = pixels.shape[0]
    ar = torch.arange(crop, device=pixels.device)
    rows = (tops.view(b, 1) + ar).view(b, crop, 1)
    cols = lefts.view(b, 1) + ar
    cols = torch.where(flips.view(b, 1), cols.flip(1), cols).view(b, 1, crop)
    batch = torch.arange(b, device=pixels.device).view(b, 1, 1)
    window = pixels[batch, rows, cols]  # (B, crop, crop, 3)
    x = window.permute(0, 3, 1, 2).float()
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


class DeviceBatches:
    """An iterable of ``(images, targets)`` on ``device``, like a DataLoader (``len``,
    ``set_epoch``, ``dataset``), fed by :class:`SquareImages`."""

    def __init__(self, images: SquareImages, dataset, *, batch_size: int, train: bool, crop: int,
                 hflip: bool, mean, std, device: torch.device, sampler, seed: int = 0, rank: int = 0,
                 prefetch: int = 4):
        if crop > images.size:
            raise ValueError(f"crop {crop} exceeds the square size {images.size}")
        self.images, self.dataset, self.sampler = images, dataset, sampler
        self.batch_size, self.train, self.crop, self.hflip = int(batch_size), bool(train), int(crop), bool(hflip)
        self.device, self.seed, self.rank, self.prefetch = torch.device(device), int(seed), int(rank), int(prefetch)
        self.targets = torch.as_tensor(np.asarray(dataset.targets, dtype=np.int64))
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device) * 255.0
        self.epoch = 0
        self.pin = self.device.type == "cuda"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def _draws(self, n: int, g: torch.Generator) -> torch.Tensor:
        """(3, n) int64: crop tops, crop lefts, flips (0/1) of one batch."""
        span = self.images.size - self.crop
        if not self.train:
            return torch.tensor([span // 2, span // 2, 0], dtype=torch.int64).view(3, 1).expand(3, n)
        tops = torch.randint(0, span + 1, (n,), generator=g)
        lefts = torch.randint(0, span + 1, (n,), generator=g)
        flips = (torch.rand(n, generator=g) < 0.5) & self.hflip
        return torch.stack([tops, lefts, flips.long()])

    def _produce(self, order: np.ndarray, out: "queue.Queue", stop: threading.Event) -> None:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
        try:
            for start in range(0, len(order), self.batch_size):
                if stop.is_set():
                    return
                idx = order[start:start + self.batch_size]
                pixels = self.images.gather(idx)
                # targets and the random draws travel as one (4, B) tensor: two copies per batch
                meta = torch.cat([self.targets[idx].view(1, -1), self._draws(len(idx), g)])
                if self.pin:  # a copy from pageable memory may wait for the device: pin both
                    pixels, meta = pixels.pin_memory(), meta.pin_memory()
                out.put((pixels, meta))
        except BaseException as exc:  # handed to the consumer, which raises it
            out.put(exc)
            return
        out.put(None)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        q: "queue.Queue" = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(order, q, stop), daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                pixels, meta = (t.to(self.device, non_blocking=True) for t in item)
                targets, tops, lefts, flips = meta
                yield augment_on_device(pixels, tops, lefts, flips.bool(), self.crop, self.mean, self.std), targets
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)
