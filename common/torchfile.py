"""The one reader of weight files a user hands the toolkit, safe for files from anywhere.

:func:`read_torch_file` reads what ``torch.save`` has written since torch 0.2: the zip layout
(torch >= 1.6) and the legacy layout (a magic-number pickle, the main pickle, then the raw
storages), pickles written by Python 2 or 3, CPU and CUDA storages, both legacy tensor
rebuild forms, Parameters and Variables of torch 0.2-0.4, and whole pickled modules; a
safetensors file is read too. Nothing a file names is imported or run: the pickle is
read by an unpickler whose ``find_class`` resolves only an allow-list (tensor rebuilding,
storages, containers, numpy scalars and arrays, ``argparse.Namespace``), known module
classes become :class:`LegacyObject` records of their attributes and tensors, and any other
global (``os.system``, ``builtins.eval``, a class of unknown code) is refused with
:class:`UnsafeFileError` naming it. The records never run: a caller rebuilds current
modules from their tensors.

Files that are not weights at all (an empty file, a saved web page, a Git LFS pointer, a
truncated download, a zip archive of something else) are named as what they are, in one
line with what to do (:class:`BrokenFileError`).
"""
from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np
import torch

from common.errors import MissingFileError, WeightsFileError
from common.safepickle import (LegacyObject, LegacyVariable, Marker, PendingTensor, Refused, SafeUnpickler,
                               Storage, is_record, module_state_dict, namespace_dict)

__all__ = ["read_torch_file", "read_state_dict", "sniff_file", "LegacyObject", "UnsafeFileError", "BrokenFileError",
           "module_state_dict", "is_record", "namespace_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class UnsafeFileError(WeightsFileError):
    """A file whose pickle names a global outside the reader's allow-list."""


class BrokenFileError(WeightsFileError):
    """A file that is not a weight file at all: empty, a web page, a pointer, truncated."""


# ---------------------------------------------------------------------------- sniffing

def sniff_file(path: Union[str, Path]) -> str:
    """What the file's first bytes say it is: ``empty``, ``html``, ``lfs``, ``safetensors``,
    ``zip``, ``pickle``, ``tar`` or ``unknown``."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"version https://git-lfs"):
        return "lfs"
    if text.startswith(b"<"):
        return "html"
    if len(head) >= 9 and 2 <= int.from_bytes(head[:8], "little") < 100_000_000 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:4] == b"PK\x05\x06":
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return "unknown"


def _broken(path: Path, kind: str, what: str) -> BrokenFileError:
    size = path.stat().st_size
    if kind == "empty":
        return BrokenFileError(f"{what} {path} is empty (0 bytes): the download or copy did not finish; fetch "
                               f"the file again")
    if kind == "html":
        return BrokenFileError(f"{what} {path} is a web page ({size} bytes of HTML), not weights: a cloud-drive "
                               f"link saved its download or sign-in page; download the file itself (from the "
                               f"page, or with the drive's direct-download link)")
    if kind == "lfs":
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        real = next((line.split()[1] for line in lines if line.startswith("size ")), "?")
        return BrokenFileError(f"{what} {path} is a Git LFS pointer ({size} bytes standing for a {real}-byte "
                               f"file), not the weights: run 'git lfs pull' in its repository, or download the "
                               f"file from the repository's web page")
    if kind == "tar":
        return BrokenFileError(f"{what} {path} is a tar archive (the layout torch used before 0.1.10, or an "
                               f"archive of files): unpack it and pass the weight file inside")
    head = path.read_bytes()[:16]
    return BrokenFileError(f"{what} {path} is not a PyTorch or safetensors file (first bytes {head!r}); pass the "
                           f"weight file itself")


def _truncated(path: Path, what: str, detail: str) -> BrokenFileError:
    return BrokenFileError(f"{what} {path} is truncated or damaged ({detail}; the file has "
                           f"{path.stat().st_size} bytes): the download did not finish; fetch it again")


# ---------------------------------------------------------------------------- reading

def _storage_from_pid(pid, table: Dict[str, Storage]) -> Storage:
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, Marker) or storage_type.dtype is None:
        raise pickle.UnpicklingError(f"storage of unknown type {storage_type!r}")
    view = pid[5] if len(pid) > 5 else None
    if key not in table:
        table[key] = Storage(key, storage_type.dtype, numel)
    root = table[key]
    if view is None:
        return root
    view_key, offset, size = str(view[0]), int(view[1]), int(view[2])
    if view_key not in table:
        table[view_key] = Storage(view_key, root.dtype, size, view=(key, offset, size))
    return table[view_key]


def _flat(raw: bytes, dtype: torch.dtype, big_endian: bool) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    if not raw:
        return torch.empty(0, dtype=dtype)
    if big_endian and size > 1:
        arr = np.frombuffer(raw, dtype=np.dtype(f">u{size}")).astype(f"<u{size}")
        raw = arr.tobytes()
    return torch.frombuffer(bytearray(raw), dtype=dtype)


def _read_zip(path: Path, what: str):
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise _truncated(path, what, f"zip archive without its directory: {exc}") from None
    with archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} files)" if len(names) > 5 else "")
            inner = [n for n in names if n.lower().endswith((".pth", ".pt", ".t7", ".tar", ".bin", ".safetensors"))]
            hint = (f"unpack it and pass {inner[0]}" if inner else "pass the weight file itself")
            raise BrokenFileError(f"{what} {path} is a zip archive of other files ({shown}), not a PyTorch file; "
                                  f"{hint}")
        prefix = pkl[0][: -len("data.pkl")]
        big = False
        if prefix + "byteorder" in names:
            big = archive.read(prefix + "byteorder").strip() == b"big"
        table: Dict[str, Storage] = {}

        def storage(pid):
            st = _storage_from_pid(pid, table)
            if st.data is None:
                entry = f"{prefix}data/{st.key}"
                try:
                    raw = archive.read(entry)
                except KeyError:
                    raise _truncated(path, what, f"storage {st.key} is missing") from None
                itemsize = torch.empty((), dtype=st.dtype).element_size()
                if len(raw) < st.numel * itemsize:
                    raise _truncated(path, what, f"storage {st.key} holds {len(raw)} of {st.numel * itemsize} bytes")
                st.data = _flat(raw[: st.numel * itemsize], st.dtype, big)
            return st

        try:
            obj = SafeUnpickler(io.BytesIO(archive.read(pkl[0])), storage).load()
        except (zipfile.BadZipFile, EOFError) as exc:
            raise _truncated(path, what, str(exc)) from None
    return obj, table


def _read_legacy(path: Path, what: str):
    raw = path.read_bytes()
    f = io.BytesIO(raw)

    def no_storage(pid):
        raise pickle.UnpicklingError("a storage before the main pickle")

    def plain():
        return SafeUnpickler(f, no_storage).load()

    try:
        magic = plain()
    except (EOFError, pickle.UnpicklingError, ValueError, IndexError) as exc:
        raise _truncated(path, what, f"unreadable pickle header: {exc}") from None
    if magic != _LEGACY_MAGIC:
        kind = type(magic).__name__
        raise BrokenFileError(f"{what} {path} is a plain Python pickle (of a {kind}), not a file written by "
                              f"torch.save; pass the weight file itself")
    try:
        protocol = plain()
        sys_info = plain()
    except (EOFError, pickle.UnpicklingError) as exc:
        raise _truncated(path, what, str(exc)) from None
    if protocol != _LEGACY_PROTOCOL:
        raise BrokenFileError(f"{what} {path} has legacy protocol version {protocol!r}; expected 1001")
    big = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    table: Dict[str, Storage] = {}
    try:
        obj = SafeUnpickler(f, lambda pid: _storage_from_pid(pid, table)).load()
        keys = plain()
    except Refused:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise _truncated(path, what, f"the pickle ends early: {exc}") from None
    order = "big" if big else "little"
    for key in keys:
        key = str(key)
        st = table.get(key)
        head = f.read(8)
        if len(head) < 8:
            raise _truncated(path, what, f"storage {key} is missing")
        count = int.from_bytes(head, order, signed=True)
        dtype = st.dtype if st is not None else torch.uint8
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if count < 0 or nbytes > len(raw) - f.tell():
            raise _truncated(path, what, f"storage {key} needs {max(count, 0)} elements, "
                                         f"{len(raw) - f.tell()} bytes are left")
        data = raw[f.tell(): f.tell() + nbytes]
        f.seek(nbytes, io.SEEK_CUR)
        if st is not None:
            st.data = _flat(data, dtype, big)
    for st in table.values():  # legacy storage views share their root's bytes
        if st.view is not None:
            root = table.get(st.view[0])
            if root is None or root.data is None:
                raise _truncated(path, what, f"storage view {st.key} has no root storage")
            st.data = root.data[st.view[1]: st.view[1] + st.view[2]]
    return obj, table


def _materialise(t: PendingTensor, path: Path, what: str) -> torch.Tensor:
    flat = t.storage.data
    if flat is None:
        raise _truncated(path, what, f"storage {t.storage.key} was never written")
    if t.dtype is not None and t.dtype != flat.dtype:
        flat = flat.view(torch.uint8).view(t.dtype) if flat.numel() else torch.empty(0, dtype=t.dtype)
    if any(s < 0 for s in t.size) or any(s < 0 for s in t.stride) or t.offset < 0:
        raise _truncated(path, what, "a tensor with negative sizes")
    if 0 in t.size:
        return torch.empty(t.size, dtype=flat.dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if last >= flat.numel():
        raise _truncated(path, what, f"a tensor of shape {list(t.size)} reaches past its storage "
                                     f"({flat.numel()} elements)")
    return torch.as_strided(flat, t.size, t.stride, t.offset)


def _resolve(obj, path: Path, what: str, memo: Dict[int, Any]):
    """Replace the pending tensors and legacy Variables by tensors, everywhere in ``obj``."""
    key = id(obj)
    if key in memo:
        return memo[key]
    if isinstance(obj, PendingTensor):
        out = _materialise(obj, path, what)
    elif isinstance(obj, LegacyVariable):
        data = obj.args[0] if obj.args else obj.attrs.get("data")
        out = _resolve(data, path, what, memo)
    elif isinstance(obj, LegacyObject):
        memo[key] = obj
        for k, v in list(obj.attrs.items()):
            obj.attrs[k] = _resolve(v, path, what, memo)
        obj.args = tuple(_resolve(v, path, what, memo) for v in obj.args)
        obj.state = _resolve(obj.state, path, what, memo)
        return obj
    elif isinstance(obj, dict):
        memo[key] = obj
        for k, v in list(obj.items()):
            obj[k] = _resolve(v, path, what, memo)
        return obj
    elif isinstance(obj, list):
        memo[key] = obj
        obj[:] = [_resolve(v, path, what, memo) for v in obj]
        return obj
    elif isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        out = type(obj)(_resolve(v, path, what, memo) for v in obj) if type(obj) is tuple else obj
    elif isinstance(obj, (set, frozenset)):
        out = type(obj)(_resolve(v, path, what, memo) for v in obj)
    else:
        return obj
    memo[key] = out
    return out


def read_torch_file(path: Union[str, Path], what: str = "weight file") -> Any:
    """The contents of ``path`` (a ``torch.save`` file of any layout, or safetensors) with
    CPU tensors, and :class:`LegacyObject` records in place of pickled modules and other
    known objects. Nothing the file names is imported or run: a global outside the
    allow-list raises :class:`UnsafeFileError`; a file that is not weights raises
    :class:`BrokenFileError`. ``what`` starts the messages (``backbone file``, ...)."""
    path = Path(path)
    if path.is_dir():
        raise MissingFileError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise MissingFileError(f"{what} {path} does not exist")
    kind = sniff_file(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load
        try:
            return st_load(path.read_bytes())
        except (SafetensorError, ValueError, OSError) as exc:
            raise _truncated(path, what, f"unreadable safetensors: {exc}") from None
    if kind not in ("zip", "pickle"):
        raise _broken(path, kind, what)
    try:
        obj, _ = _read_zip(path, what) if kind == "zip" else _read_legacy(path, what)
    except Refused as exc:
        raise UnsafeFileError(
            f"{what} {path} names {exc.global_name}, which this reader does not load: it reads tensors, containers "
            f"and the known model classes of the published files, and runs nothing a file names (a file that "
            f"names other code can run it under torch.load(weights_only=False))") from None
    except (pickle.UnpicklingError, struct.error, TypeError, AttributeError) as exc:
        raise _truncated(path, what, f"{type(exc).__name__}: {exc}") from None
    return _resolve(obj, path, what, {})


# ------------------------------------------------------------------ state dicts

_WRAPPERS = ("state_dict", "model", "model_state_dict", "module")


def _keys(keys, n: int = 4) -> str:
    keys = sorted(map(str, keys))
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def read_state_dict(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(state dict of tensors, metadata) of a weight file, unwrapped and without
    ``module.`` prefixes (a whole pickled network gives its own state dict; ``state_dict``,
    ``model``, ``model_state_dict``, ``module`` wrappers are opened). Metadata comes from
    safetensors headers (else empty)."""
    path = Path(path)
    meta: Dict[str, str] = {}
    obj = read_torch_file(path, "weight file")  # any torch.save layout or safetensors; nothing is run
    if sniff_file(path) == "safetensors":
        from common.weightsfile import safetensors_metadata
        meta = safetensors_metadata(path, "weights")
    return _normalise(obj, str(path)), meta


def _normalise(obj, what: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, LegacyObject) and obj.is_module:  # a whole pickled network
        obj = module_state_dict(obj)
    for _ in range(3):
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), LegacyObject)
                          and obj[k].is_module), None)
            if inner is not None:
                obj = module_state_dict(inner)
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsFileError(f"{what} holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsFileError(f"{what} holds no tensors (top-level keys: {_keys(list(obj))})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
