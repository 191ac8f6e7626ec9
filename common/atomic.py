"""Files written so that no reader ever sees half of one: atomic writes through a temporary
file in the destination folder and ``os.replace``, strict JSON, and the cleanup of the
temporaries a killed process left behind.

Atomic writes go through a temporary file ``.<name>.<random>.tmp`` in the destination
folder; a process killed mid-write leaves one behind, which :func:`remove_stale_temp_files`
clears when the next run starts in that folder. A full disk ends the write with
:class:`~common.errors.DiskFullError` naming the file, its size and that the previous file
is intact.

JSON written here is strict: NaN/inf become ``null`` (e.g. the IoU of a class absent from
the evaluation set), tensors and numpy scalars become numbers.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Union

import torch

from common.errors import DiskFullError

__all__ = ["atomic_write_bytes", "atomic_write_json", "to_jsonable", "remove_stale_temp_files", "is_temp_file",
           "file_sha256", "human_size", "user_cache_dir"]

PathLike = Union[str, os.PathLike]

# Read once: os.umask can only be queried by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder + ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write; the
    temporary file is removed if anything fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _disk_full(exc, path, len(data)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise _disk_full(exc, path, len(data)) from None
        raise
    return path


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def human_size(n: int) -> str:
    """``n`` bytes as a short figure: ``812 B``, ``3.4 MB``, ``1.2 GB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _disk_full(exc: OSError, path: Path, size: int) -> OSError:
    """A full disk (or quota) as one line naming the file, its size and what is intact;
    any other OS error as it was, with the file named."""
    if exc.errno not in _FULL:
        if exc.filename is None:
            exc.filename = str(path)
        return exc
    kept = f"the previous {path.name} is intact" if path.exists() else f"{path.name} was not written"
    return DiskFullError(exc.errno, f"no space left on the device of {path.parent} to write {path.name} "
                                    f"({human_size(size)}); {kept}: free space and run the same command again",
                         str(path))


# The names atomic_write_bytes gives its temporary files: "." + target name + "." +
# mkstemp's random part + ".tmp".
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def is_temp_file(name: str) -> bool:
    """Whether ``name`` is that of an atomic write's temporary file."""
    return bool(_TEMP_RE.match(name))


def remove_stale_temp_files(folder: PathLike) -> List[Path]:
    """Delete the temporary files of atomic writes that a killed process left in
    ``folder`` (not in sub-folders); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if _TEMP_RE.match(path.name) and path.is_file():
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (torch.device, torch.dtype, os.PathLike)):
        return str(obj)
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar / 0-d array
        return to_jsonable(obj.tolist() if hasattr(obj, "tolist") else obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot write a {type(obj).__name__} ({obj!r}) as JSON")


def atomic_write_json(path: PathLike, obj: Any, indent: Optional[int] = 2) -> Path:
    """Write ``obj`` as strict JSON (NaN/inf -> null) to ``path`` atomically."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def user_cache_dir() -> Path:
    """The folder for caches that belong to no run: ``$PIGGYBACK_CACHE``, else
    ``$XDG_CACHE_HOME/piggyback``, else ``~/.cache/piggyback``."""
    if os.environ.get("PIGGYBACK_CACHE"):
        return Path(os.environ["PIGGYBACK_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "piggyback"


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes (identifies a backbone or weight file wherever it lies)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
