"""Test fixtures in the layouts of published PyTorch files, written here, never downloaded.

* :func:`write_legacy` writes the legacy (non-zip) layout that torch 0.2-1.5 wrote: the
  magic-number pickle, the protocol version, ``sys_info``, the main pickle with
  ``('storage', <type>, key, location, numel, None)`` persistent ids and ``('module', <class>,
  file, source)`` ids for pickled modules, the list of storage keys, then per storage an
  int64 element count and its raw bytes. Options reproduce the eras: the 0.2/0.3 tensor
  rebuild (``_rebuild_tensor``, four arguments) or ``_rebuild_tensor_v2``; Parameters and
  Variables as their class applied to ``(data,)`` with ``(requires_grad, volatile, hooks)``
  state; Python 2 pickles (byte strings for ``str``, ``__builtin__`` / ``copy_reg`` names);
  storages tagged ``cuda:0`` with CUDA storage types.
* :func:`published_modules` imports the stand-ins of the published code (``models``,
  ``config_task``, ``networks``, ``modnets.layers`` in ``tests/published``) for the time of a
  ``with`` block, so that files name their classes exactly as the published files do.
* :func:`malicious_pickle` and :func:`broken_download` write the files a reader must refuse.
"""
from __future__ import annotations

import contextlib
import io
import logging
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

PUBLISHED = Path(__file__).resolve().parent / "published"
_STANDINS = ("models", "config_task", "networks", "modnets", "modnets.layers")
MAGIC = 0x1950A86A20F9469CFC6C


@contextlib.contextmanager
def published_modules():
    """The stand-in modules, importable under the published code's module names."""
    saved = {name: sys.modules.pop(name) for name in _STANDINS if name in sys.modules}
    sys.path.insert(0, str(PUBLISHED))
    try:
        import config_task
        import models
        import modnets.layers
        import networks
        yield {"models": models, "config_task": config_task, "networks": networks, "layers": modnets.layers}
    finally:
        sys.path.remove(str(PUBLISHED))
        for name in _STANDINS:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _storage_class(dtype: torch.dtype, cuda: bool):
    name = {torch.float32: "FloatStorage", torch.float64: "DoubleStorage", torch.float16: "HalfStorage",
            torch.int64: "LongStorage", torch.int32: "IntStorage", torch.uint8: "ByteStorage",
            torch.int8: "CharStorage", torch.bool: "BoolStorage", torch.bfloat16: "BFloat16Storage"}[dtype]
    return getattr(torch.cuda if cuda else torch, name)


class _LegacyPickler(pickle._Pickler):
    """Python's own pickler with the persistent ids, tensor reductions and string forms
    of the legacy torch files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, f, storages, *, cuda=False, v1=False, old_variables=False, py2=False):
        super().__init__(f, protocol=2, fix_imports=True)
        self.storages, self.cuda, self.v1, self.old_variables, self.py2 = storages, cuda, v1, old_variables, py2
        self.classes = set()

    def save_str(self, obj):
        if self.py2 and all(ord(c) < 128 for c in obj):  # a Python 2 byte string
            data = obj.encode("latin1")
            if len(data) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
            else:
                self.write(pickle.BINSTRING + len(data).to_bytes(4, "little") + data)
            self.memoize(obj)
        else:
            pickle._Pickler.save_str(self, obj)

    dispatch[str] = save_str

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _storage_class(obj.dtype, self.cuda), obj.key,
                    "cuda:0" if self.cuda else "cpu", obj.numel, None)
        if isinstance(obj, type) and issubclass(obj, nn.Module) and obj not in self.classes:
            self.classes.add(obj)  # the class inside its own persistent id is pickled by name
            return ("module", obj, "<source file>", "<source>")
        return None

    def reducer_override(self, obj):
        if isinstance(obj, nn.Parameter):
            if self.old_variables:
                return nn.Parameter, (obj.data,), (obj.requires_grad, False, OrderedDict())
            if not self.v1:
                return torch._utils._rebuild_parameter, (obj.data, obj.requires_grad, OrderedDict())
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            key = t.untyped_storage().data_ptr()
            if key not in self.storages:
                self.storages[key] = _StorageRef(t)
            ref = self.storages[key]
            size, stride, offset = tuple(t.shape), tuple(t.stride()), t.storage_offset()
            if self.v1:
                return torch._utils._rebuild_tensor, (ref, offset, torch.Size(size), stride)
            return torch._utils._rebuild_tensor_v2, (ref, offset, torch.Size(size), stride,
                                                     bool(obj.requires_grad), OrderedDict())
        return NotImplemented


class _StorageRef:
    def __init__(self, t: torch.Tensor):
        storage = t.untyped_storage()
        self.dtype = t.dtype
        self.key = str(len(_StorageRef.counter))
        _StorageRef.counter.append(self)
        self.numel = storage.nbytes() // t.element_size()
        self.raw = torch.empty(0, dtype=torch.uint8).set_(storage.cpu(), 0, (storage.nbytes(),)).numpy().tobytes()

    counter: list = []


def write_legacy(path, obj, *, cuda=False, v1=False, old_variables=False, py2=False) -> Path:
    """Write ``obj`` in torch's legacy layout (see the module docstring)."""
    path = Path(path)
    storages: dict = {}
    buf = io.BytesIO()

    def dump(value):
        _LegacyPickler(buf, {}, py2=py2).dump(value)

    dump(MAGIC)
    dump(1001)
    dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 8}})
    pickler = _LegacyPickler(buf, storages, cuda=cuda, v1=v1, old_variables=old_variables, py2=py2)
    pickler.dump(obj)
    refs = list(storages.values())
    dump([r.key for r in refs])
    for r in refs:
        buf.write(r.numel.to_bytes(8, "little", signed=True))
        buf.write(r.raw)
    path.write_bytes(buf.getvalue())
    return path


# ----------------------------------------------------------------------- hostile files

class _Reduce:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def malicious_pickle(path, kind: str = "os.system", layout: str = "zip") -> Path:
    """A torch file whose pickle calls ``os.system`` / ``builtins.eval`` / ``subprocess``
    (or builds an object of an unknown class) when loaded the unsafe way."""
    import builtins
    import os
    import subprocess
    marker = Path(path).with_suffix(".ran")
    payload = {
        "os.system": _Reduce(os.system, (f"touch {marker}",)),
        "builtins.eval": _Reduce(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess": _Reduce(subprocess.call, (["touch", str(marker)],)),
        "unknown-class": _Reduce(logging.Logger, ("x",)),
    }[kind]
    obj = {"state_dict": {"w": torch.zeros(2)}, "extra": payload}
    if layout == "zip":
        torch.save(obj, path)
    else:
        write_legacy(path, obj)
    return Path(path)




def broken_download(path, kind: str) -> Path:
    """What users meet instead of a checkpoint: ``html``, ``lfs``, ``truncated``,
    ``truncated-legacy``, ``zip-other``, ``empty``."""
    path = Path(path)
    if kind == "html":
        path.write_text("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>"
                        "<body>Download anyway</body></html>")
    elif kind == "lfs":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 +
                        "\nsize 24567891\n")
    elif kind in ("truncated", "truncated-legacy"):
        full = path.with_suffix(".full")
        state = {"conv.weight": torch.randn(64, 3, 3, 3), "fc.weight": torch.randn(10, 64)}
        if kind == "truncated":
            torch.save(state, full)
        else:
            write_legacy(full, state)
        data = full.read_bytes()
        full.unlink()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif kind == "zip-other":
        import zipfile
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("README.txt", "weights inside")
            z.writestr("imnet.t7", b"\x80\x02")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(kind)
    return path
