"""Batches that keep a GPU fed: square-resized images in one uint8 array, augmented on the device.

The paper's decathlon augmentation resizes every image to a ``resize`` px square, then
takes a random ``crop`` px window and (per task) flips it. The resize does not depend on
the random draw, so it is done once: :class:`SquareImages` holds every image of a split
already resized, as one ``(N, resize, resize, 3)`` uint8 array (memory-mapped under
``--cache-dir``, filled once by parallel workers, refilled only when the annotation
file changes). :class:`DeviceBatches` then serves batches. With ``resident`` (decathlon.train's
``--images-on-device``) the whole array is copied to the device once and each batch is one
gather there, then a subtraction and a division: no thread, no copy per batch. Otherwise
a background thread gathers each batch's uint8 pixels into pinned memory, the copy to the
device runs asynchronously, and crop, flip, conversion and normalisation run there. Nothing
is decoded or resized per epoch.

The pixels are exactly those of :class:`decathlon.transforms.DecathlonTransform` (same
resize); evaluation batches are identical to the worker loader's. Random crops and flips
are drawn per epoch from a generator seeded by ``(seed, epoch, rank)``, so a resumed run
sees the same augmentation as an uninterrupted one, with the images resident or not.
Random rescaling (``--scale``) is not done here; the worker loader serves it.
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

__all__ = ["SquareImages", "DeviceBatches", "augment_on_device", "crop_indices", "gather_windows",
           "images_fit_on_device"]


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

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.pixels.shape))

    def gather(self, indices: np.ndarray, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The uint8 pixels of ``indices`` as a (B, S, S, 3) tensor (into ``out`` when given)."""
        batch = torch.from_numpy(self.pixels[indices])
        if out is None:
            return batch
        out[: len(indices)].copy_(batch)
        return out[: len(indices)]


def crop_indices(tops: torch.Tensor, lefts: torch.Tensor, flips: torch.Tensor, crop: int):
    """(rows, cols), each (B, crop) int64: the pixel rows and columns of each image's
    ``crop`` window at (tops, lefts), the columns reversed where ``flips`` is nonzero."""
    ar = torch.arange(crop, device=tops.device)
    rows = tops.view(-1, 1) + ar
    cols = lefts.view(-1, 1) + torch.where(flips.view(-1, 1) != 0, ar.flip(0), ar)
    return rows, cols


def gather_windows(pixels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mean: torch.Tensor,
                   std: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalised float (B, 3, crop, crop) from uint8 ``pixels`` (B, S, S, 3), or from rows
    ``index`` of a whole (N, S, S, 3) array: one gather, then ``(x - 255 mean) / (255 std)``
    (the conversion to float happens inside the subtraction)."""
    b, crop = rows.shape
    first = (index if index is not None else torch.arange(b, device=pixels.device)).view(b, 1, 1)
    window = pixels[first, rows.view(b, crop, 1), cols.view(b, 1, crop)]  # (B, crop, crop, 3)
    return torch.sub(window.permute(0, 3, 1, 2), mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


def augment_on_device(pixels: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, flips: torch.Tensor,
                      crop: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, crop, crop): a ``crop`` window at
    (tops, lefts) per image, mirrored where ``flips``, then ``(x - 255 mean) / (255 std)``."""
    rows, cols = crop_indices(tops, lefts, flips, crop)
    return gather_windows(pixels, rows, cols, mean, std)


def images_fit_on_device(images, device: torch.device, share: float = 0.25) -> bool:
    """Whether the :class:`SquareImages` ``images`` together take at most ``share`` of
    ``device``'s free memory (the rest is the training's)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return sum(im.nbytes for im in images) <= share * free


class DeviceBatches:
    """An iterable of ``(images, targets)`` on ``device``, like a DataLoader (``len``,
    ``set_epoch``, ``dataset``), fed by :class:`SquareImages`.

    Each epoch's plan (sample order, targets, crop offsets, flips) is drawn at its start
    from the ``(seed, epoch, rank)`` generator. With ``resident`` the whole uint8 array is
    copied to the device once and each batch is gathered there (no thread, no copy per
    batch); otherwise a background thread gathers each batch's pixels on the host into
    pinned memory. Both give the same batches."""

    def __init__(self, images: SquareImages, dataset, *, batch_size: int, train: bool, crop: int,
                 hflip: bool, mean, std, device: torch.device, sampler, seed: int = 0, rank: int = 0,
                 prefetch: int = 4, resident: bool = False):
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
        self.resident = bool(resident)
        self._resident_pixels: Optional[torch.Tensor] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def plan(self) -> torch.Tensor:
        """(5, N) int64, in batch order: sample index, target, crop top, crop left, flip (0/1)."""
        order = torch.from_numpy(np.fromiter(iter(self.sampler), dtype=np.int64))
        n, span = len(order), self.images.size - self.crop
        if self.train:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
            tops = torch.randint(0, span + 1, (n,), generator=g)
            lefts = torch.randint(0, span + 1, (n,), generator=g)
            flips = ((torch.rand(n, generator=g) < 0.5) & self.hflip).long()
        else:
            tops = lefts = torch.full((n,), span // 2, dtype=torch.int64)
            flips = torch.zeros(n, dtype=torch.int64)
        return torch.stack([order, self.targets[order], tops, lefts, flips])

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # a non-blocking copy from pageable memory may wait for the device: pin first
        return t.pin_memory().to(self.device, non_blocking=True) if self.pin else t.to(self.device)

    def _produce(self, plan: torch.Tensor, out: "queue.Queue", stop: threading.Event) -> None:
        try:
            for start in range(0, plan.shape[1], self.batch_size):
                if stop.is_set():
                    return
                part = plan[:, start:start + self.batch_size]
                pixels = self.images.gather(part[0].numpy())
                meta = part[1:].contiguous()  # targets with the draws: one copy per batch
                if self.pin:
                    pixels, meta = pixels.pin_memory(), meta.pin_memory()
                out.put((pixels, meta))
        except BaseException as exc:  # handed to the consumer, which raises it
            out.put(exc)
            return
        out.put(None)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan()
        if self.resident:
            yield from self._resident_batches(plan)
            return
        q: "queue.Queue" = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(plan, q, stop), daemon=True)
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
                yield augment_on_device(pixels, tops, lefts, flips, self.crop, self.mean, self.std), targets
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)

    def _resident_batches(self, plan: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._resident_pixels is None:
            self._resident_pixels = torch.from_numpy(np.asarray(self.images.pixels)).to(self.device)
        plan = self._to_device(plan)
        index, targets = plan[0], plan[1]
        rows, cols = crop_indices(plan[2], plan[3], plan[4], self.crop)  # the whole epoch's windows at once
        for start in range(0, plan.shape[1], self.batch_size):
            part = slice(start, start + self.batch_size)
            yield (gather_windows(self._resident_pixels, rows[part], cols[part], self.mean, self.std,
                                  index=index[part]), targets[part])
