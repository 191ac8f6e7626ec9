"""Decoded-image cache: one uint8 memory-mapped file per task and annotation file.

After the first epoch no JPEG is decoded again.  Images keep their own size (their
height and width are known from the annotation file, so every image's offset is fixed
before any is decoded); pixels are stored as flat RGB bytes.  A second one-byte-per-image
file marks which images are filled, so the cache fills lazily during the first epoch, from
any number of loader workers, and an interrupted fill simply continues.  A JSON sidecar
records what the cache holds; a different annotation file gives a new cache.  An image
whose decoded size differs from its annotation is served uncached, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence, Tuple, Union

import numpy as np

__all__ = ["DecodedCache"]

_FORMAT = 1


def _fingerprint(file_names: np.ndarray, shapes: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(b"\0".join(file_names.tolist()))
    h.update(np.ascontiguousarray(shapes, dtype=np.int64).tobytes())
    return h.hexdigest()


def _create_sized(path: Path, size: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)  # sparse: costs no disk until written
    os.replace(tmp, path)


class DecodedCache:
    """Images of one annotation file, decoded once and memory-mapped afterwards."""

    def __init__(self, directory: Path, key: str, file_names: Sequence[Union[str, bytes]],
                 shapes: Sequence[Tuple[int, int]]):
        self.directory = Path(directory)
        self.file_names = np.array([n.encode("utf-8") if isinstance(n, str) else bytes(n)
                                    for n in file_names], dtype=np.bytes_)
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        sizes = self.shapes[:, 0] * self.shapes[:, 1] * 3
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.pixels_path = self.directory / f"{key}.u8"
        self.filled_path = self.directory / f"{key}.filled"
        self.meta_path = self.directory / f"{key}.json"
        meta = {"format": _FORMAT, "images": len(self.shapes), "bytes": int(self.offsets[-1]),
                "fingerprint": _fingerprint(self.file_names, self.shapes)}
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._read_meta() != meta:
            # New or stale: the sidecar is written last, so a half-made cache is redone.
            _create_sized(self.pixels_path, max(1, meta["bytes"]))
            _create_sized(self.filled_path, max(1, meta["images"]))
            tmp = self.meta_path.with_name(f".{self.meta_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, self.meta_path)
        self._pixels = None
        self._filled = None
        self._warned = False

    def _read_meta(self):
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None

    def __getstate__(self):
        # Memory maps are reopened in each loader worker rather than pickled.
        state = self.__dict__.copy()
        state["_pixels"] = state["_filled"] = None
        return state

    def _open(self) -> None:
        if self._pixels is None:
            self._pixels = np.memmap(self.pixels_path, dtype=np.uint8, mode="r+")
            self._filled = np.memmap(self.filled_path, dtype=np.uint8, mode="r+")

    def __len__(self) -> int:
        return len(self.shapes)

    def filled(self) -> int:
        """How many images are in the cache."""
        self._open()
        return int(np.count_nonzero(self._filled[: len(self.shapes)]))

    def filled_flags(self) -> np.ndarray:
        """One boolean per image: whether its pixels are in the cache."""
        self._open()
        return np.asarray(self._filled[: len(self.shapes)]) != 0

    def get(self, index: int, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """Image ``index`` from the cache, or ``decode()`` it and store it."""
        self._open()
        h, w = (int(v) for v in self.shapes[index])
        start, stop = self.offsets[index], self.offsets[index + 1]
        if self._filled[index]:
            return np.array(self._pixels[start:stop]).reshape(h, w, 3)
        img = decode()
        if img.shape != (h, w, 3):
            # The annotation's size is wrong for this file: serve it decoded every time
            # rather than stop a run over one image, and say so once.
            if not self._warned:
                self._warned = True
                warnings.warn(f"image {self.file_names[index].decode('utf-8')} decodes to "
                              f"{img.shape[1]}x{img.shape[0]} px but its annotation says {w}x{h}; "
                              f"such images are not cached")
            return img
        self._pixels[start:stop] = img.reshape(-1)
        # The flag is set after the pixels, so a killed fill never marks a partial image.
        self._filled[index] = 1
        return img
