"""The ways of training a task on a pretrained network: one record per method.

One registry for every pipeline. A :class:`Method` owns, for its method:

- how a network whose new layers (``head``: the task's classifier, FCN's score layers)
  are already in place becomes trainable, and which parameter groups it trains: ``main``
  (masks, or backbone weights), ``head`` (the new layers and, with task-specific
  batch-norm, the norm layers) and ``extras`` (a mask scheme's trained values beside the
  mask, e.g. ``affine``'s scalars), each with its own optimizer;
- its optimizer defaults;
- the artifact a finished run writes (``masks.safetensors`` or ``weights.safetensors``),
  how it is saved and how evaluation loads it back.

- ``piggyback``: masks of a registered scheme (``binary`` by default) on every
  conv/linear of the frozen backbone (eq. 4-7); its optimizer and learning rate come from
  the recipe (:mod:`common.recipes`).
- ``finetune``: every weight trains (weights the model builder froze stay frozen, e.g.
  FCN's fixed bilinear upsampling).
- ``feature``: the new layers alone train on frozen features ("classifier only").
- ``scratch``: the same network from random initialisation, every weight trains.

``train_bn`` is a modifier of ``piggyback`` and ``feature``: batch-norm layers become
per-task state (paper section 5.3). A pipeline names its new modules and builds its
network; everything else about a method is asked of its record. :func:`save_task` and
:func:`load_task` are the run-level pair every command uses: a run folder or a task file
in, a trained task out, whatever the method.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from common.errors import MissingFileError, UsageError, WeightsFileError
from common.masking import (NORM_TYPES, mask_parameters, piggyback, scheme_parameter_scales, scheme_parameters,
                            task_parameters)
from common.schemes import DEFAULT_SCHEME

__all__ = ["Method", "Prepared", "MaskSettings", "METHODS", "get_method", "register_method", "method_names",
           "save_task", "load_task",
           "task_file", "WEIGHTS_FILE", "MASKS_FILE", "WEIGHTS_FORMAT"]

MASKS_FILE = "masks.safetensors"
WEIGHTS_FILE = "weights.safetensors"
# The one format of full-weight files; the names earlier pipelines wrote are still read.
WEIGHTS_FORMAT = "piggyback-toolkit-weights"
_LEGACY_WEIGHTS_FORMATS = ("decathlon-weights", "classification-weights", "fcn32s-weights")
_LEGACY_WEIGHTS_FILES = ("model.safetensors",)


@dataclass(frozen=True)
class MaskSettings:
    """``piggyback``'s mask keywords: the scheme and how the real-valued masks start."""

    scheme: str = DEFAULT_SCHEME
    threshold: float = 5e-3
    mask_init: str = "spread"
    mask_scale: float = 1e-2
    mask_spread: float = 3e-3

    def as_kwargs(self) -> Dict[str, object]:
        return {"scheme": self.scheme, "threshold": self.threshold, "mask_init": self.mask_init,
                "mask_scale": self.mask_scale, "mask_spread": self.mask_spread}


@dataclass
class Prepared:
    """The parameter groups of a prepared model (``main``, ``head``, ``extras``: the mask
    scheme's trained values), and the modules that must stay in eval mode while training
    (frozen batch-norm of the ``feature`` baseline)."""

    main: List[nn.Parameter]
    head: List[nn.Parameter]
    frozen_modules: List[nn.Module] = field(default_factory=list)
    extras: List[nn.Parameter] = field(default_factory=list)
    # the learning-rate factor of each extra (common.masking.scheme_parameter_scales)
    extras_lr_scales: List[Union[float, Tuple[float, ...]]] = field(default_factory=list)

    def trainable_values(self) -> int:
        return sum(p.numel() for p in self.main + self.head + self.extras)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs_backbone: bool  # starts from pretrained weights
    uses_masks: bool  # the result is a mask file, not full weights
    supports_train_bn: bool  # --train-bn is meaningful (BN is frozen otherwise)
    optimizer: Optional[str]  # default of the main group; None: from the recipe / no main group
    lr: Optional[float]
    weight_decay: float
    _prepare: Callable[..., Prepared] = field(repr=False, compare=False)
    artifact: str = WEIGHTS_FILE  # the file a finished run holds

    def prepare(self, model: nn.Module, *, head: Sequence[str], masks: Optional[MaskSettings] = None,
                train_bn: bool = False) -> Prepared:
        """Make ``model`` trainable for this method in place. ``head`` names the task's
        new modules; ``masks`` are the mask settings (methods that train masks; default
        :class:`MaskSettings`)."""
        if train_bn and not self.supports_train_bn:
            raise UsageError(f"train_bn: batch-norm layers already train with method {self.name}")
        if masks is not None and not self.uses_masks:
            raise UsageError(f"mask settings only apply to a method that trains masks, not {self.name}")
        names = dict(model.named_modules())
        missing = [h for h in head if h not in names]
        if missing:
            raise UsageError(f"head modules {missing} are not in {type(model).__name__}")
        return self._prepare(model, tuple(head), masks or MaskSettings(), train_bn)

    def save(self, model: nn.Module, run_dir, **meta) -> Path:
        """Write the trained task into ``run_dir`` as this method's artifact."""
        from common.maskfile import save_masks
        from common.weightsfile import save_weights_file
        path = Path(run_dir) / self.artifact
        if self.uses_masks:
            return save_masks(model, path, **meta)
        return save_weights_file(path, model, format=WEIGHTS_FORMAT, **dict(meta, method=self.name))


def _in_head(name: str, head: Sequence[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in head)


def _split(model: nn.Module, head: Sequence[str]) -> Prepared:
    main, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (new if _in_head(name, head) else main).append(p)
    return Prepared(main=main, head=new)


def _prepare_piggyback(model, head, masks: MaskSettings, train_bn) -> Prepared:
    piggyback(model, **masks.as_kwargs(), train_bn=train_bn, skip=head)
    return Prepared(main=mask_parameters(model), head=task_parameters(model), extras=scheme_parameters(model),
                    extras_lr_scales=scheme_parameter_scales(model))


def _prepare_full(model, head, masks, train_bn) -> Prepared:
    return _split(model, head)


def _prepare_feature(model, head, masks, train_bn) -> Prepared:
    trainable = {id(p) for name, p in model.named_parameters() if p.requires_grad and _in_head(name, head)}
    norms = [m for name, m in model.named_modules()
             if isinstance(m, NORM_TYPES) and not _in_head(name, head)]
    if train_bn:  # classifier plus task-specific BN
        trainable |= {id(p) for m in norms for p in m.parameters(recurse=False)}
        norms = []
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return Prepared(main=[], head=[p for p in model.parameters() if p.requires_grad],
                    frozen_modules=[m for m in norms if isinstance(m, nn.modules.batchnorm._NormBase)])


METHODS: Dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (refused when its name is taken, unless ``replace``);
    every training command's ``--method`` lists the registry."""
    if method.name in METHODS and not replace:
        raise UsageError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _method in (
    Method("piggyback", "masks (--scheme) on the frozen backbone + new classifier", True, True, True,
           None, None, 0.0, _prepare_piggyback, MASKS_FILE),
    Method("finetune", "all weights from the backbone + new classifier", True, False, False,
           "sgd", 1e-2, 5e-4, _prepare_full),
    Method("feature", "new classifier on frozen backbone features", True, False, True,
           None, None, 0.0, _prepare_feature),
    Method("scratch", "the same network from random initialisation", False, False, False,
           "sgd", 0.1, 5e-4, _prepare_full),
):
    register_method(_method)


def method_names() -> List[str]:
    """The registered methods (what ``--method`` accepts)."""
    return list(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


# ------------------------------------------------------------------ run-level save / load

def task_file(target) -> Path:
    """The trained task of a run folder (the artifact its method wrote), or ``target``
    itself when it is a file."""
    target = Path(target)
    if target.is_file():
        return target
    if not target.is_dir():
        raise MissingFileError(f"{target} does not exist (expected a run folder or a task file)")
    names = list(dict.fromkeys(m.artifact for m in METHODS.values())) + list(_LEGACY_WEIGHTS_FILES)
    for name in names:
        if (target / name).is_file():
            return target / name
    raise MissingFileError(f"{target} holds no trained task ({', '.join(names)}): the run has not finished "
                           f"(re-run its training command to resume it)")


def save_task(run_dir, model: nn.Module, method: str, **meta) -> Path:
    """Write ``model``'s trained task into ``run_dir`` as ``method``'s artifact; returns the path."""
    return get_method(method).save(model, run_dir, **meta)


def read_task_metadata(target) -> dict:
    """The metadata of a run folder's (or a file's) trained task, with ``method`` and
    ``file``: the mask file's header for masks, the weights file's meta otherwise."""
    from common.maskfile import MASK_FORMAT, read_mask_metadata
    from common.weightsfile import read_weights_metadata, safetensors_metadata
    path = task_file(target)
    header = safetensors_metadata(path, "task")
    if header.get("format") == MASK_FORMAT:
        meta = read_mask_metadata(path)
        meta.setdefault("method", "piggyback")
    else:
        fmt = header.get("format")
        if fmt is not None and fmt != WEIGHTS_FORMAT and fmt not in _LEGACY_WEIGHTS_FORMATS:
            raise WeightsFileError(f"{path} is neither a mask file nor a weights file of this toolkit "
                                   f"(header key 'format' = {fmt!r})")
        meta = read_weights_metadata(path)
    meta["file"] = str(path)
    return meta


def load_task(target, model: nn.Module, *, check_fingerprint: bool = True) -> dict:
    """Load the trained task of a run folder or task file into ``model`` and return its
    metadata (``method`` included). Masks convert a plain network by themselves (as
    :func:`common.maskfile.load_masks`); full weights must fit the network exactly."""
    from common.maskfile import load_masks
    from common.weightsfile import load_weights_file
    meta = read_task_metadata(target)
    path = Path(meta["file"])
    if get_method(meta.get("method", "finetune")).uses_masks:
        loaded = load_masks(model, path, check_fingerprint=check_fingerprint)
        return dict(loaded, method=meta["method"], file=str(path))
    load_weights_file(model, path)
    return meta
