"""The one image decoder of every pipeline: any file PIL reads -> the 8-bit RGB a person sees.

``Image.convert("RGB")`` alone is wrong for several modes a dataset can hold: it clips
16-bit grayscale to 255 (a mid-grey 16-bit PNG comes out white), drops alpha (a
transparent pixel shows whatever colour happens to be stored under it) and warns about
palette transparency. :func:`to_rgb` converts every mode explicitly:

* ``1``, ``L``, ``P``, ``RGB``, ``RGBX``, ``CMYK``, ``YCbCr``, ``HSV``: PIL's conversion
  (``1`` gives 0/255; CMYK uses PIL's formula ``R = 255 - min(255, C + K)``; PIL's JPEG
  reader already undoes the inversion of Adobe CMYK files);
* ``LAB``: through an sRGB profile (PIL's plain conversion only copies channels);
* ``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, a palette with alpha entries or a
  ``transparency`` entry in ``img.info`` (a transparent index, grey level or colour):
  composited on ``background`` (white by default), never dropped;
* ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``: 16-bit values, ``round(v * 255 / 65535)``;
* ``I`` (32-bit integers): a file holding values above 255 is 16-bit data and is scaled
  like the 16-bit modes (values clipped to 0-65535 first); one whose values all lie in
  0-255 is 8-bit data stored wide and is kept as it is (negative values clip to 0);
* ``F`` (32-bit float): values all in [0, 1] (a normalised image) are scaled by 255;
  otherwise they are taken as 0-255 values and clipped; NaN becomes 0.

:func:`decode_rgb` opens and fully decodes a file (``Image.open`` + ``load``, so a file
cut short fails here rather than as grey rows later) and raises :class:`DataError`
naming the file and PIL's reason for a corrupt, truncated or oversized one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Sequence, Tuple, Union

import numpy as np

from common.errors import DataError, MissingFileError, UsageError

__all__ = ["decode_rgb", "load_rgb_array", "to_rgb", "DEFAULT_BACKGROUND"]

DEFAULT_BACKGROUND = (255, 255, 255)
Source = Union[str, os.PathLike, IO[bytes]]

_PIL_TO_RGB = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_16BIT = 65535


def _background(background: Sequence[int]) -> Tuple[int, int, int]:
    try:
        bg = tuple(int(v) for v in background)
    except (TypeError, ValueError):
        bg = ()
    if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
        raise UsageError(f"background must be three values in 0-255, got {background!r}")
    return bg  # type: ignore[return-value]


def _gray_to_rgb(gray: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB")


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    v = np.clip(values.astype(np.float64), 0, _16BIT)
    return np.floor(v * 255.0 / _16BIT + 0.5)


def _wide_to_gray(img) -> np.ndarray:
    """8-bit grey levels of a 16-bit, 32-bit integer or float single-channel image."""
    mode = img.mode
    values = np.asarray(img)
    if mode.startswith("I;16"):
        return _scale_16bit(values)
    if mode == "I":
        if values.size and values.max() > 255:
            return _scale_16bit(values)
        return np.clip(values, 0, 255)
    # mode "F"
    v = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if v.size and v.min() >= 0.0 and v.max() <= 1.0:
        v = v * 255.0
    return np.floor(np.clip(v, 0.0, 255.0) + 0.5)


def _alpha_image(opaque: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.where(opaque, 255, 0).astype(np.uint8))


def _composite(rgba, background: Tuple[int, int, int]):
    """RGBA -> RGB over ``background``, in integers so an opaque pixel keeps its value."""
    from PIL import Image

    a = np.asarray(rgba, dtype=np.uint32)
    alpha = a[..., 3:4]
    if alpha.min(initial=255) == 255:
        return rgba.convert("RGB")
    bg = np.asarray(background, dtype=np.uint32)
    out = (a[..., :3] * alpha + bg * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8))


def _has_transparency(img) -> bool:
    if "transparency" in img.info:
        return True
    if img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA":
        return True
    return False


def _lab_to_rgb(img):
    from PIL import ImageCms

    transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                        "LAB", "RGB")
    return ImageCms.applyTransform(img, transform)


def to_rgb(img, *, background: Sequence[int] = DEFAULT_BACKGROUND):
    """An 8-bit ``RGB`` copy of an opened PIL image (the image itself when it is RGB
    without transparency); the conversion rules are in the module docstring."""
    bg = _background(background)
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _ALPHA_MODES:
        if mode == "La":
            img = img.convert("LA")
        return _composite(img.convert("RGBA"), bg)
    if mode.startswith("I;16") or mode in ("I", "F"):
        gray = _wide_to_gray(img)
        rgb = _gray_to_rgb(gray)
        if "transparency" in img.info and mode != "F":
            # the transparent value is given in the file's own 16-bit or integer units
            opaque = np.asarray(img) != img.info["transparency"]
            rgba = rgb.convert("RGBA")
            rgba.putalpha(_alpha_image(opaque))
            return _composite(rgba, bg)
        return rgb
    if mode in _PIL_TO_RGB:
        if _has_transparency(img):
            return _composite(img.convert("RGBA"), bg)
        return img.convert("RGB")
    if mode == "LAB":
        return _lab_to_rgb(img)
    raise DataError(f"image mode {mode!r} has no RGB conversion")


def _name(source: Source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return str(getattr(source, "name", "<image stream>"))


def decode_rgb(source: Source, *, background: Sequence[int] = DEFAULT_BACKGROUND,
               exif_transpose: bool = False):
    """Open, fully decode and convert ``source`` (a path or a binary file object) to an
    8-bit RGB PIL image; alpha is composited on ``background``.

    ``exif_transpose`` applies the EXIF orientation tag (what a photo viewer shows); it is
    off by default so that pixels stay aligned with label maps and annotation sizes made
    from the stored image. A missing path raises :class:`MissingFileError`; a file PIL
    cannot read, a truncated one or a decompression bomb raises :class:`DataError`
    ``"<file>: not a readable image (<reason>)"`` whose ``reason`` attribute holds the
    reason alone."""
    from PIL import Image, ImageOps

    bg = _background(background)
    name = _name(source)
    if isinstance(source, (str, os.PathLike)) and not Path(source).exists():
        raise MissingFileError(f"image {name} does not exist")
    try:
        with Image.open(source) as img:
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img, background=bg)
            if rgb is img:
                rgb = img.copy()  # the file closes when the with block ends
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, DataError):
            reason = str(exc)
        else:
            reason = str(exc) or type(exc).__name__
        error = DataError(f"{name}: not a readable image ({reason})")
        error.reason = reason
        raise error from None
    return rgb


def load_rgb_array(source: Source, *, background: Sequence[int] = DEFAULT_BACKGROUND,
                   exif_transpose: bool = False) -> np.ndarray:
    """:func:`decode_rgb` as a uint8 array of shape (H, W, 3)."""
    return np.asarray(decode_rgb(source, background=background, exif_transpose=exif_transpose),
                      dtype=np.uint8).copy()
