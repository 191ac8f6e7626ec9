"""One frozen backbone in memory serving many tasks.

Each task brings its packed masks (1 bit per weight), the extras of its mask scheme (if
any), its task state (head, task-specific norm layers) and its name. Tasks of different
schemes (binary, ternary, affine, a registered one) share one backbone: ``set_task`` sets
each masked layer to the task's scheme and threshold, unpacks the task's masks into it and
points the task modules at that task's own tensors. No backbone weight is reloaded or
copied, and switching costs one pass over the mask bits.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from .errors import MaskFileError, UsageError
from .maskfile import _check_compatible, read_mask_file, task_state
from .masking import backbone_fingerprint, conversion_settings, mask_entries, set_layer_scheme
from .schemes import get_scheme

__all__ = ["MultiTaskModel"]


def _owner(model: nn.Module, key: str):
    module_name, _, leaf = key.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), leaf


def _sync_shape_attributes(module: nn.Module) -> None:
    # A head of another class count replaces the tensors; keep the informational
    # attributes in step with them.
    w = getattr(module, "weight", None)
    if w is None:
        return
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = w.shape[0], w.shape[1]
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = w.shape[1] * module.groups if module.transposed else w.shape[0]
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = w.shape[0]


def _from_model(model: nn.Module):
    """(masks, task state, metadata, extras) of a trained piggybacked model, as a mask file
    holds them."""
    entries = mask_entries(model)
    if not entries:
        raise UsageError("add_task needs a mask file or a model converted by common.masking.piggyback")
    settings = conversion_settings(model)
    meta = {"layers": {e.key: {"shape": list(e.weight.shape)} for e in entries},
            "scheme": settings["scheme"], "threshold": settings["threshold"],
            "fingerprint": backbone_fingerprint(model)}
    extras = {e.key: {k: t.detach().float() for k, t in e.extras.items()} for e in entries if e.extras}
    return {e.key: e.binary() for e in entries}, task_state(model), meta, extras


class _TaskStore(nn.Module):
    """A task's packed masks and task tensors, as buffers so they move with .to()."""

    def __init__(self):
        super().__init__()
        self.mask_keys: Dict[str, str] = {}
        self.extra_keys: Dict[str, str] = {}
        self.state_keys: Dict[str, str] = {}

    def add(self, kind: str, key: str, tensor: torch.Tensor) -> None:
        slot = f"{kind}{len(getattr(self, kind + '_keys'))}"
        self.register_buffer(slot, tensor)
        getattr(self, kind + "_keys")[key] = slot


class MultiTaskModel(nn.Module):
    """Wrap a piggybacked backbone; ``add_task`` mask files, ``set_task`` to switch.

    ``add_backbone_task(name)`` registers the backbone's own task (all-ones masks, its own
    head), e.g. imagenet12 in the Visual Decathlon.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if not mask_entries(backbone):
            raise UsageError("MultiTaskModel needs a backbone converted by common.masking.piggyback "
                             "(piggyback(model, skip=(<head>,)) or load_masks(model, file) on a plain model)")
        self.backbone = backbone
        self.tasks = nn.ModuleDict()
        self.metadata: Dict[str, dict] = {}
        self.schemes: Dict[str, tuple] = {}  # task -> (scheme name, threshold)
        self.current: Optional[str] = None
        self._entries = {e.key: e for e in mask_entries(backbone)}
        # the backbone's own tensors for every key some task overrides
        self.base_state = _TaskStore()

    def _new_store(self, name: str) -> _TaskStore:
        if name in self.tasks:
            raise UsageError(f"task {name!r} is already loaded")
        store = _TaskStore()
        self.tasks[name] = store
        return store

    def add_task(self, name: str, source, *, check_fingerprint: bool = True) -> dict:
        """Add a task from a mask file (path) or from a trained piggybacked model over the
        same backbone (its masks, head and norm state are copied); return its metadata."""
        if isinstance(source, nn.Module):
            masks, state, meta, extras = _from_model(source)
            origin = f"model for task {name!r}"
        else:
            masks, state, meta, extras = read_mask_file(source)
            origin = source
        _check_compatible(self.backbone, origin, meta, check_fingerprint)
        own = task_state(self.backbone)
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise MaskFileError(f"{origin}: task tensors {unknown} have no matching module in the backbone")
        wrong = sorted(k for k, t in state.items() if t.dtype != own[k].dtype)
        if wrong:
            raise MaskFileError(f"{origin}: task tensors {wrong[:5]} are {state[wrong[0]].dtype}, the backbone's "
                                f"are {own[wrong[0]].dtype}")
        scheme = get_scheme(meta["scheme"])
        store = self._new_store(name)
        for key, e in self._entries.items():
            store.add("mask", key, scheme.pack(masks[key]).to(e.weight.device))
            for k, t in extras.get(key, {}).items():
                store.add("extra", f"{key}/{k}", t.detach().clone().to(e.weight.device))
        for key, t in state.items():
            if key not in self.base_state.state_keys:
                self.base_state.add("state", key, own[key].detach())
            store.add("state", key, t.detach().clone().to(own[key].device))
        self.metadata[name] = meta
        self.schemes[name] = (scheme.name, float(meta["threshold"]))
        return meta

    def add_backbone_task(self, name: str) -> None:
        """The backbone's own task: every mask entry 1 and the backbone's own task state."""
        store = self._new_store(name)
        binary = get_scheme("binary")
        for key, e in self._entries.items():
            ones = torch.ones_like(e.weight, dtype=torch.float32)
            store.add("mask", key, binary.pack(ones).to(e.weight.device))
        self.metadata[name] = {"task": name, "backbone_task": True}
        self.schemes[name] = ("binary", float(conversion_settings(self.backbone)["threshold"]))

    @torch.no_grad()
    def set_task(self, name: str) -> None:
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; loaded tasks: {sorted(self.tasks)}")
        store = self.tasks[name]
        scheme_name, threshold = self.schemes[name]
        scheme = get_scheme(scheme_name)
        for key, slot in store.mask_keys.items():
            e = self._entries[key]
            extras = {k: getattr(store, store.extra_keys[f"{key}/{k}"]) for k in scheme.extras}
            if e.module.scheme != scheme or e.module.threshold != threshold:
                set_layer_scheme(e.module, scheme, threshold)
            for k, t in e.extras.items():
                t.copy_(extras[k])
            e.set(scheme.unpack(getattr(store, slot), e.weight.shape, dtype=e.mask_real.dtype))
        tensors = {key: getattr(self.base_state, slot) for key, slot in self.base_state.state_keys.items()}
        tensors.update({key: getattr(store, slot) for key, slot in store.state_keys.items()})
        for key, t in tensors.items():
            module, leaf = _owner(self.backbone, key)
            if leaf in module._parameters:
                module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
            else:
                module._buffers[leaf] = t
            _sync_shape_attributes(module)
        self.current = name

    def _apply(self, fn, *args, **kwargs):
        # moved buffers are new tensors: point the task modules at them again
        out = super()._apply(fn, *args, **kwargs)
        if self.current is not None:
            self.set_task(self.current)
        return out

    def forward(self, *args, **kwargs):
        if self.current is None:
            raise RuntimeError(f"call set_task(name) first; loaded tasks: {sorted(self.tasks)}")
        return self.backbone(*args, **kwargs)
