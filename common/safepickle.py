"""The pickle allow-list of :mod:`common.torchfile`: what a safe read of a PyTorch file
resolves the globals of its pickle to, and the inert records known objects become.

:class:`SafeUnpickler`'s ``find_class`` resolves only tensor rebuilding, storage types,
containers, numpy scalars and arrays, ``argparse.Namespace`` and the module classes of
the published files (:data:`KNOWN_MODULE_CLASSES`, and ``torch.nn``'s own); anything else
raises :class:`Refused` naming the global. Known classes become :class:`LegacyObject`
records of their attributes and tensors, which never run. Tensors are rebuilt later
(:class:`PendingTensor`), once the storages' bytes are read.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

__all__ = ["LegacyObject", "LegacyVariable", "module_state_dict", "KNOWN_MODULE_CLASSES", "SafeUnpickler", "Refused",
           "Storage", "PendingTensor", "Marker", "resolve_global", "is_record", "namespace_dict"]


class LegacyObject:
    """An object of a known class read from a pickle: its class name, its attributes
    (``attrs``) and constructor arguments (``args``), inert. Module records hold
    ``_parameters``, ``_buffers`` and ``_modules`` among their attributes, as the pickled
    modules did."""

    type_name = "object"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.attrs, obj.state = tuple(args), {}, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.attrs.update(state)
        elif (isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], (dict, type(None)))
              and isinstance(state[1], (dict, type(None)))):
            self.attrs.update(state[0] or {})
            self.attrs.update(state[1] or {})
        else:
            self.state = state

    @property
    def name(self) -> str:
        """The class name without its module, e.g. ``Conv2d``."""
        return self.type_name.rpartition(".")[2]

    def get(self, key: str, default=None):
        """The attribute ``key`` as the live object would answer it: a plain attribute, or a
        sub-module, parameter or buffer of that name."""
        if key in self.attrs:
            return self.attrs[key]
        for group in ("_modules", "_parameters", "_buffers"):
            members = self.attrs.get(group)
            if isinstance(members, dict) and key in members:
                return members[key]
        return default

    @property
    def is_module(self) -> bool:
        return isinstance(self.attrs.get("_modules"), dict)

    def children(self) -> Dict[str, "LegacyObject"]:
        mods = self.attrs.get("_modules") or {}
        return {k: v for k, v in mods.items() if v is not None}

    def named_modules(self, prefix: str = "", memo=None) -> Iterator[Tuple[str, "LegacyObject"]]:
        """(dotted name, record) of this module and every sub-module, in registration order,
        each once: what ``nn.Module.named_modules`` gives."""
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, child in self.children().items():
            if isinstance(child, LegacyObject):
                yield from child.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def __repr__(self) -> str:
        return f"<{self.type_name} record: {', '.join(sorted(self.attrs)[:8])}>"


def module_state_dict(record: LegacyObject) -> Dict[str, torch.Tensor]:
    """The ``state_dict`` a module record would give: its parameters and buffers, and those of
    its sub-modules, by dotted name."""
    out: Dict[str, torch.Tensor] = {}
    for prefix, module in record.named_modules():
        for group in ("_parameters", "_buffers"):
            for key, value in (module.attrs.get(group) or {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"{prefix}.{key}" if prefix else key] = value
    return out


class LegacyVariable(LegacyObject):
    """A Parameter or Variable of torch 0.2-0.4, pickled as its class applied to (data,)."""


class Marker:
    """A global that stands for itself (a storage type, a base class of a reconstructor)."""

    def __init__(self, name: str, dtype: Optional[torch.dtype] = None):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<{self.name}>"


# ----------------------------------------------------------------------- the allow-list

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = {"float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32",
                "int", "int16", "short", "int8", "uint8", "bool", "complex64", "complex128"}

# Module classes of the published code this reader knows, by the module that defines them
# (the original repositories' file names; a longer package path ending in them is accepted).
KNOWN_MODULE_CLASSES: Dict[str, Tuple[str, ...]] = {
    # torchvision's networks the released masks and checkpoints hold
    "torchvision.models.resnet": ("ResNet", "Bottleneck", "BasicBlock"),
    "torchvision.models.vgg": ("VGG",),
    "torchvision.models.densenet": ("DenseNet", "_DenseLayer", "_DenseBlock", "_Transition"),
    # arunmallya/piggyback: the wrappers, the masked layers and their forked networks
    "networks": ("ModifiedVGG16", "ModifiedVGG16BN", "ModifiedResNet", "ModifiedDenseNet", "ResNetDiffInit",
                 "View"),
    "modnets.layers": ("ElementWiseConv2d", "ElementWiseLinear", "Binarizer", "Ternarizer"),
    "modnets.resnet": ("ResNet", "Bottleneck", "BasicBlock"),
    "modnets.vgg": ("VGG",),
    "modnets.densenet": ("DenseNet", "_DenseLayer", "_DenseBlock", "_Transition"),
    # srebuffi/residual_adapters: the decathlon ResNet-26
    "models": ("ResNet", "BasicBlock", "conv_task", "conv1x1"),
}


def _torch_nn_classes():
    names = set()
    for name in dir(torch.nn):
        obj = getattr(torch.nn, name)
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            names.add(name)
    return frozenset(names)


_TORCH_NN = _torch_nn_classes()


def _known_module(module: str, name: str) -> bool:
    if module.startswith("torch.nn.modules.") or module == "torch.nn":
        return name in _TORCH_NN
    for known, names in KNOWN_MODULE_CLASSES.items():
        if name in names and (module == known or module.endswith("." + known)):
            return True
    return False


@dataclass
class Storage:
    key: str
    dtype: torch.dtype
    numel: int  # elements of dtype (bytes for an untyped storage)
    view: Optional[Tuple[str, int, int]] = None  # legacy storage views: (view key, offset, size)
    data: Optional[torch.Tensor] = None  # flat, filled when the bytes are read


@dataclass
class PendingTensor:
    storage: Storage
    offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: Optional[torch.dtype] = None  # _rebuild_tensor_v3 over an untyped storage


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    return PendingTensor(storage, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *rest):
    t = _rebuild_tensor(storage, storage_offset, size, stride)
    t.dtype = dtype if isinstance(dtype, torch.dtype) else None
    return t


def _rebuild_parameter(data, *rest):
    return data


def _rebuild_from_type(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        raise pickle.UnpicklingError("a tensor of a subclass rebuilt by an unknown function")
    return func(*args)


def _reconstructor(cls, base, state):
    if not (isinstance(cls, type) and issubclass(cls, LegacyObject)):
        raise pickle.UnpicklingError(f"copyreg._reconstructor of {cls!r}")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__setstate__(state)
    return obj


def _encode(text, encoding="utf-8", errors="strict"):
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(str, 'latin1').
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode(encoding, errors)


_FACTORIES = (None, list, dict, set, int, float, collections.OrderedDict)


def _defaultdict(factory=None, *rest):
    if factory not in _FACTORIES:
        raise pickle.UnpicklingError(f"collections.defaultdict of {factory!r}")
    return collections.defaultdict(factory)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("numpy scalar of an object dtype")
    if isinstance(data, str):  # a Python 2 byte string read as latin-1
        data = data.encode("latin1")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _np_reconstruct(cls, shape, dtype_code):
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"numpy array of class {cls!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _np_dtype(name, align=False, copy=False):
    if isinstance(name, bytes):
        name = name.decode("latin1")
    return np.dtype(name, align, copy)


_FUNCTIONS: Dict[Tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "Counter"): collections.Counter,
    ("collections", "defaultdict"): _defaultdict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "range"): range,
    **{("builtins", t.__name__): t for t in (list, dict, tuple, int, float, str, bool, bytes)},
    ("torch", "device"): torch.device,
    ("builtins", "object"): Marker("object"),
    ("torch._C", "_FunctionBase"): Marker("torch._C._FunctionBase"),
    ("torch.autograd.function", "Function"): Marker("torch.autograd.function.Function"),
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _encode,
    ("torch", "Size"): torch.Size,
    ("torch", "Tensor"): Marker("torch.Tensor"),
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"): lambda: None,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _np_dtype,
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_RECORD_CLASSES: Dict[str, type] = {}


def _record_class(qualified: str, base=LegacyObject) -> type:
    cls = _RECORD_CLASSES.get(qualified)
    if cls is None:
        cls = type(qualified.rpartition(".")[2], (base,), {"type_name": qualified, "__module__": __name__})
        _RECORD_CLASSES[qualified] = cls
    return cls


def resolve_global(module: str, name: str):
    """What the safe unpickler gives for the global ``module.name``; raises
    :class:`pickle.UnpicklingError` for anything outside the allow-list."""
    # Python 2 names (and Python 3 ones a protocol-2 pickler wrote as Python 2's), as
    # pickle's own find_class maps them
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _PY2_MODULES.get(module, _compat_pickle.IMPORT_MAPPING.get(module, module))
    if (module, name) in _FUNCTIONS:
        return _FUNCTIONS[(module, name)]
    if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
        return Marker(f"{module}.{name}", _STORAGE_DTYPES[name])
    if module == "torch" and name in _DTYPE_NAMES:
        return getattr(torch, name)
    if (module, name) in (("torch.nn.parameter", "Parameter"), ("torch.autograd.variable", "Variable"),
                          ("torch.nn.parameter", "UninitializedParameter")):
        return _record_class(f"{module}.{name}", LegacyVariable)
    if (module, name) == ("argparse", "Namespace") or _known_module(module, name):
        return _record_class(f"{module}.{name}")
    raise Refused(f"{module}.{name}")


class Refused(pickle.UnpicklingError):
    def __init__(self, name: str):
        super().__init__(name)
        self.global_name = name


class SafeUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: Callable[[tuple], Any]):
        super().__init__(file, encoding="latin1")
        self._storage = storages

    def find_class(self, module, name):
        return resolve_global(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        kind = pid[0].decode("latin1") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # legacy files: the class of a pickled module (pid[1], resolved above)
            return pid[1]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id kind {kind!r}")
        return self._storage(pid)


def is_record(obj, *names: str) -> bool:
    """Whether ``obj`` is a record of a class named one of ``names`` (class name only)."""
    return isinstance(obj, LegacyObject) and (not names or obj.name in names)


def namespace_dict(obj) -> Dict[str, Any]:
    """The attributes of an ``argparse.Namespace`` record (or of a real Namespace / dict)."""
    if isinstance(obj, LegacyObject):
        return dict(obj.attrs)
    if isinstance(obj, argparse.Namespace):
        return vars(obj)
    return dict(obj) if isinstance(obj, dict) else {}
