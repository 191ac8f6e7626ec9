"""The piggyback authors' released files, in this toolkit's terms.

Two kinds of file, both torch 0.2 pickles read through :func:`common.torchfile.read_torch_file`
(nothing in them is run):

* **packed masks** (``{'dataset2masks': {dataset: {module_idx: uint8 mask}},
  'dataset2classifiers': {dataset: nn.Linear}}``, one file per architecture): the
  thresholded masks, one byte per weight, a ternary -1 stored as 255;
* **training checkpoints** (``{'args', 'epoch', 'accuracy', 'errors', 'model'}``): the whole
  wrapper network, whose ``ElementWiseConv2d`` / ``ElementWiseLinear`` layers hold the
  real-valued ``mask_real``, the frozen weights and the thresholder.

``module_idx`` is a position in ``enumerate(wrapper.shared.modules())``, index 0 being
``shared`` itself; :func:`shared_module_names` gives the torchvision module at each position
for ``vgg16``, ``vgg16_bn``, ``resnet50`` and ``densenet121``. Every mask is checked against
that network layer by layer before anything is converted.

The authors evaluate a mask by zeroing the masked-out weights of the plain torchvision
network (negating those of a ternary -1), installing the dataset's classifier and
scoring with the test preprocessing of the dataset: ``*_cropped`` images resized straight
to 224 x 224, the others resized to 256 on the shorter side and centre-cropped to 224.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from common.errors import MaskFileError, UsageError, WeightsFileError
from common.heads import get_classifier, reset_classifier
from common.masking import mask_entries, piggyback
from common.torchfile import LegacyObject, namespace_dict, read_torch_file

__all__ = ["ARCHS", "torchvision_arch", "shared_module_names", "PublishedTask", "read_published",
           "convert_published", "init_from_checkpoint", "eval_transform_of", "DEFAULT_THRESHOLD"]

# The authors' architecture names -> torchvision's.
ARCHS = {"vgg16": "vgg16", "vgg16bn": "vgg16_bn", "vgg16_bn": "vgg16_bn", "resnet50": "resnet50",
         "densenet121": "densenet121"}
DEFAULT_THRESHOLD = 5e-3
_MASKED = (nn.Conv2d, nn.Linear)


def torchvision_arch(arch: str) -> str:
    """The torchvision name of one of the released architectures."""
    if arch not in ARCHS:
        raise UsageError(f"--arch {arch!r}: the released masks are for {', '.join(sorted(set(ARCHS.values())))}")
    return ARCHS[arch]


def shared_module_names(arch: str, model: nn.Module) -> List[Optional[str]]:
    """The torchvision module name at each position of the authors'
    ``enumerate(shared.modules())`` for ``model`` (a torchvision ``arch``); ``None`` where the
    authors' module has no torchvision counterpart (``shared`` itself, VGG's reshape)."""
    arch = torchvision_arch(arch)
    if arch.startswith("vgg"):
        features = [f"features.{i}" for i in range(len(model.features))]
        return [None] + features + [None] + [f"classifier.{i}" for i in range(6)]
    if arch == "resnet50":
        return [None] + [n for n, _ in model.named_modules() if n and n.split(".")[0] != "fc"]
    return [None] + [f"features.{n}" for n, _ in model.features.named_modules() if n]


@dataclass
class PublishedTask:
    """One dataset of a released file: its masks by module position (float values in
    {0, 1} or {-1, 0, 1}), its classifier, the thresholder, and from a checkpoint the
    real-valued masks, frozen tensors and arguments."""

    dataset: str
    masks: Dict[int, torch.Tensor]
    classifier: Tuple[torch.Tensor, Optional[torch.Tensor]]
    scheme: str = "binary"
    threshold: float = DEFAULT_THRESHOLD
    real: Dict[int, torch.Tensor] = field(default_factory=dict)
    frozen: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)
    args: dict = field(default_factory=dict)
    cropped: bool = False

    @property
    def num_classes(self) -> int:
        return int(self.classifier[0].shape[0])


def _linear(obj, where: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(obj, LegacyObject) and obj.is_module:
        params = obj.get("_parameters") or {}
        weight, bias = params.get("weight"), params.get("bias")
    elif isinstance(obj, dict):
        weight, bias = obj.get("weight"), obj.get("bias")
    else:
        weight = bias = None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise WeightsFileError(f"{where} is not a linear classifier (got {type(obj).__name__})")
    return weight.float(), bias.float() if isinstance(bias, torch.Tensor) else None


def _packed_mask(value, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise WeightsFileError(f"{where} is a {getattr(value, 'dtype', type(value).__name__)}, expected a uint8 mask")
    bad = ~((value == 0) | (value == 1) | (value == 255))
    if bool(bad.any()):
        raise WeightsFileError(f"{where} holds values other than 0, 1 and 255 (-1)")
    out = value.to(torch.float32)
    out[value == 255] = -1.0
    return out


def _thresholder(module: LegacyObject) -> Tuple[str, float]:
    info = module.get("info") if isinstance(module.get("info"), dict) else {}
    fn = module.get("threshold_fn")
    kind = info.get("threshold_fn") or (fn.name.lower() if isinstance(fn, LegacyObject) else None) or "binarizer"
    threshold = info.get("threshold")
    if threshold is None and isinstance(fn, LegacyObject):
        threshold = fn.get("threshold")
    kind = {"binarizer": "binary", "ternarizer": "ternary"}.get(str(kind).lower())
    if kind is None:
        raise WeightsFileError(f"layer {module.type_name} has thresholder {info.get('threshold_fn')!r}; expected "
                               f"binarizer or ternarizer")
    return kind, float(DEFAULT_THRESHOLD if threshold is None else threshold)


def _threshold(real: torch.Tensor, scheme: str, threshold: float) -> torch.Tensor:
    """The authors' thresholders: 1 above the threshold; ternary -1 below zero."""
    mask = (real > threshold).to(torch.float32)
    if scheme == "ternary":
        mask -= (real < 0).to(torch.float32)
    return mask


def _from_checkpoint(raw: dict, path: Path) -> Dict[str, PublishedTask]:
    model, args = raw["model"], namespace_dict(raw.get("args"))
    if not (isinstance(model, LegacyObject) and isinstance(model.get("shared"), LegacyObject)):
        raise WeightsFileError(f"{path}: 'model' is a {getattr(model, 'type_name', type(model).__name__)}, not one of "
                               f"the piggyback wrappers (networks.ModifiedVGG16, ModifiedResNet, ...) with 'shared'")
    dataset = str(args.get("dataset") or "")
    head = model.get("classifier")
    if head is None:
        names, heads = list(model.get("datasets") or []), model.get("classifiers")
        mods = heads.children() if isinstance(heads, LegacyObject) else {}
        if dataset in names and str(names.index(dataset)) in mods:
            head = mods[str(names.index(dataset))]
    if head is None:
        raise WeightsFileError(f"{path}: the checkpoint's model has no classifier for dataset {dataset!r}")
    if not dataset:
        raise WeightsFileError(f"{path}: the checkpoint's args name no dataset")
    task = PublishedTask(dataset, {}, _linear(head, f"{path}: the classifier"), args=args,
                         cropped="cropped" in dataset or "cropped" in str(args.get("train_path") or ""))
    schemes = set()
    for idx, module in enumerate(model.get("shared").modules()):
        tensors = {k: v for group in ("_parameters", "_buffers") for k, v in (module.get(group) or {}).items()
                   if isinstance(v, torch.Tensor)}
        if module.name.startswith("ElementWise"):
            real = tensors.get("mask_real")
            weight = module.get("weight")
            if not isinstance(real, torch.Tensor) or not isinstance(weight, torch.Tensor):
                raise WeightsFileError(f"{path}: layer {idx} ({module.type_name}) lacks mask_real or its weight")
            scheme, threshold = _thresholder(module)
            schemes.add((scheme, threshold))
            task.real[idx] = real.float()
            task.masks[idx] = _threshold(real.float(), scheme, threshold)
            tensors = {"weight": weight}
            if isinstance(module.get("bias"), torch.Tensor):
                tensors["bias"] = module.get("bias")
        if tensors:
            task.frozen[idx] = tensors
    if len(schemes) != 1:
        raise WeightsFileError(f"{path}: the checkpoint's masked layers use {len(schemes)} thresholders "
                               f"({sorted(schemes)}); expected one")
    task.scheme, task.threshold = schemes.pop()
    return {dataset: task}


def read_published(path) -> Tuple[str, Dict[str, PublishedTask]]:
    """(``packed`` | ``checkpoint``, {dataset: task}) of a released masks file or training
    checkpoint of the piggyback authors."""
    path = Path(path)
    raw = read_torch_file(path, "masks file")
    if isinstance(raw, dict) and {"args", "model"} <= set(raw) and isinstance(raw.get("model"), LegacyObject):
        return "checkpoint", _from_checkpoint(raw, path)
    if not (isinstance(raw, dict) and isinstance(raw.get("dataset2masks"), dict)
            and isinstance(raw.get("dataset2classifiers"), dict)):
        keys = sorted(raw)[:6] if isinstance(raw, dict) else type(raw).__name__
        raise WeightsFileError(f"{path} is neither a packed masks file ({{'dataset2masks', 'dataset2classifiers'}}) "
                               f"nor a training checkpoint of the piggyback code ({{'args', 'model', ...}}); it "
                               f"holds {keys}")
    tasks = {}
    for dataset, masks in raw["dataset2masks"].items():
        if dataset not in raw["dataset2classifiers"]:
            raise WeightsFileError(f"{path}: dataset {dataset!r} has masks but no classifier in dataset2classifiers")
        if not isinstance(masks, dict) or not masks:
            raise WeightsFileError(f"{path}: dataset2masks[{dataset!r}] holds no masks")
        values = {int(k): _packed_mask(v, f"{path}: dataset2masks[{dataset!r}][{k}]") for k, v in masks.items()}
        ternary = any(bool((m < 0).any()) for m in values.values())
        tasks[str(dataset)] = PublishedTask(str(dataset), values,
                                            _linear(raw["dataset2classifiers"][dataset],
                                                    f"{path}: dataset2classifiers[{dataset!r}]"),
                                            scheme="ternary" if ternary else "binary", cropped="cropped" in dataset)
    return "packed", tasks


def _layers(arch: str, model: nn.Module, task: PublishedTask, origin: str) -> Dict[str, int]:
    """{torchvision module name: module position} of every mask, each checked to fit."""
    names = shared_module_names(arch, model)
    modules = dict(model.named_modules())
    found = {}
    for idx in sorted(task.masks):
        name = names[idx] if 0 <= idx < len(names) else None
        module = modules.get(name) if name else None
        shape = tuple(task.masks[idx].shape)
        if not isinstance(module, _MASKED):
            what = f"{name} is a {type(module).__name__}" if module is not None else \
                f"{arch} has no layer there ({len(names) - 1} modules)"
            raise MaskFileError(f"{origin}: mask {idx} (shape {list(shape)}) does not fit {arch}: module {idx} of "
                                f"its shared part: {what}; these masks are for another architecture")
        if tuple(module.weight.shape) != shape:
            raise MaskFileError(f"{origin}: mask {idx} has shape {list(shape)}, {arch}'s {name} has weights of shape "
                                f"{list(module.weight.shape)}: masks of another architecture, or weights of "
                                f"another shape")
        found[name] = idx
    if not found:
        raise MaskFileError(f"{origin} holds no masks")
    return found


def _check_frozen(arch: str, model: nn.Module, task: PublishedTask, origin: str, weights: str) -> List[str]:
    """The norm layers whose statistics the checkpoint changed (trained per task); refuses
    a checkpoint whose frozen conv/linear weights differ from ``weights``."""
    names = shared_module_names(arch, model)
    modules = dict(model.named_modules())
    changed_norms = []
    for idx, tensors in task.frozen.items():
        name = names[idx] if idx < len(names) else None
        module = modules.get(name) if name else None
        if module is None:
            continue
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        for key, value in tensors.items():
            if key not in own or own[key] is None or key == "num_batches_tracked":
                continue
            if tuple(own[key].shape) != tuple(value.shape) or not torch.allclose(
                    own[key].float(), value.float(), rtol=0, atol=1e-6):
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    changed_norms.append(name)
                    break
                raise WeightsFileError(f"{origin}: the checkpoint's frozen {name}.{key} differs from {weights}: its "
                                       f"masks were trained on other backbone weights (the authors used "
                                       f"torchvision's original 2017 files)")
    return changed_norms


def _convert_task(base: nn.Module, arch: str, task: PublishedTask, origin: str, weights: str) -> nn.Module:
    """A piggybacked copy of ``base`` holding ``task``'s masks and classifier."""
    model = copy.deepcopy(base)
    layers = _layers(arch, model, task, origin)
    norms = _check_frozen(arch, model, task, origin, weights) if task.frozen else []
    weight, bias = task.classifier
    head_name = reset_classifier(model, task.num_classes)
    head = model.get_submodule(head_name)
    if head.in_features != weight.shape[1]:
        raise MaskFileError(f"{origin}: the classifier of {task.dataset!r} takes {weight.shape[1]} features, "
                            f"{arch}'s classifier {head.in_features}")
    with torch.no_grad():
        head.weight.copy_(weight)
        if head.bias is not None:
            head.bias.copy_(bias if bias is not None else torch.zeros_like(head.bias))
    if norms:  # task-specific batch-norm (trained with --train_bn): the checkpoint's own values
        names = shared_module_names(arch, model)
        for idx, tensors in task.frozen.items():
            name = names[idx] if idx < len(names) else None
            if name in norms:
                own = model.get_submodule(name)
                with torch.no_grad():
                    for key, value in tensors.items():
                        getattr(own, key).copy_(value)
    piggyback(model, threshold=task.threshold, scheme=task.scheme, mask_init="constant", skip=(head_name,),
              train_bn=bool(norms))
    for entry in mask_entries(model):
        idx = layers.get(entry.key)
        entry.set(task.masks[idx] if idx is not None else torch.ones_like(entry.weight))
    return model


def eval_transform_of(task: PublishedTask) -> dict:
    """The authors' test preprocessing of a dataset, as ``classification.evaluate`` reads it."""
    return {"size": 224, "eval_resize": 224 if task.cropped else 256, "eval_mode": "squash" if task.cropped else "crop"}


def convert_published(path, arch: Optional[str], weights, out_dir, log: Callable[[str], None] = print) -> List[Path]:
    """Write one mask file per dataset of a released masks file or training checkpoint,
    ``out_dir/<dataset>.safetensors``, loadable into the plain torchvision network whose
    ImageNet weights are ``weights``; every dataset is checked before the first file is
    written. ``arch`` may be None for a checkpoint (its ``args.arch``). Returns the files."""
    from classification.models import pretrained_model
    from classification.weights import resolve_weights
    from common.maskfile import save_masks
    from common.atomic import file_sha256
    path, out_dir = Path(path), Path(out_dir)
    kind, tasks = read_published(path)
    if arch is None:
        recorded = {str(t.args.get("arch")) for t in tasks.values() if t.args.get("arch")}
        if len(recorded) != 1:
            raise UsageError(f"--arch is needed: {path} does not record its architecture")
        arch = recorded.pop()
    tv = torchvision_arch(arch)
    weights_path = resolve_weights(weights, tv)
    base, _ = pretrained_model(tv, 1000, weights_path)
    base.eval()
    for name, task in tasks.items():  # every dataset fits before anything is written
        origin = f"{path} [{name}]"
        _layers(tv, base, task, origin)
        if task.frozen:
            _check_frozen(tv, base, task, origin, str(weights_path))
        head = get_classifier(base)[1]
        if head.in_features != task.classifier[0].shape[1]:
            raise MaskFileError(f"{origin}: the classifier takes {task.classifier[0].shape[1]} features, {tv}'s "
                                f"classifier {head.in_features}: masks of another architecture")
    source_sha, backbone_sha = file_sha256(path), file_sha256(weights_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, task in tasks.items():
        model = _convert_task(base, tv, task, f"{path} [{name}]", str(weights_path))
        target = out_dir / f"{name}.safetensors"
        save_masks(model, target, task=name, arch=tv, num_classes=task.num_classes,
                   backbone=str(weights_path.resolve()), backbone_sha256=backbone_sha,
                   source_file=str(path.resolve()), source_sha256=source_sha, source_kind=kind,
                   **eval_transform_of(task))
        zeros = sum(int((m == 0).sum()) for m in task.masks.values())  # each fits one layer (_layers)
        total = sum(e.weight.numel() for e in mask_entries(model))
        log(f"{name}: {len(task.masks)} masks ({task.scheme}, {100 * zeros / max(total, 1):.2f}% of {total:,} "
            f"weights off), {task.num_classes}-way classifier -> {target} ({target.stat().st_size:,} bytes)")
        written.append(target)
        del model
    return written


@torch.no_grad()
def init_from_checkpoint(model: nn.Module, path, arch: str, *, weights: str, train_bn: bool,
                         scheme: str, threshold: float) -> dict:
    """Start a piggybacked torchvision ``model`` (its new classifier included) from the
    authors' training checkpoint ``path``: its real-valued masks (thresholded here as
    there: values at the threshold are moved just under it), its classifier and, with
    ``train_bn``, its batch-norm layers. Returns what was read (dataset, epoch, accuracy)."""
    path = Path(path)
    kind, tasks = read_published(path)
    if kind != "checkpoint":
        raise UsageError(f"--init-masks {path} is a packed masks file (thresholded masks only); pass one of the "
                         f"authors' training checkpoints, which hold the real-valued masks")
    task = next(iter(tasks.values()))
    recorded = task.args.get("arch")
    tv = torchvision_arch(arch)
    if recorded and ARCHS.get(str(recorded)) != tv:
        raise UsageError(f"--init-masks {path} was trained on {recorded}, not --arch {arch}")
    if task.scheme != scheme:
        raise UsageError(f"--init-masks {path} holds {task.scheme} masks (its {task.scheme[:-1]}izer); pass "
                         f"--scheme {task.scheme}")
    if not math.isclose(task.threshold, threshold, rel_tol=1e-9, abs_tol=0.0):
        raise UsageError(f"--init-masks {path} thresholds at {task.threshold:g}; pass --threshold {task.threshold:g}")
    entries = {e.key: e for e in mask_entries(model)}
    origin = f"--init-masks {path}"
    layers = _layers(tv, model, task, origin)  # masked layers keep their names and frozen weights
    norms = _check_frozen(tv, model, task, origin, weights)
    if norms and not train_bn:
        raise UsageError(f"{origin} trained its batch-norm layers per task ({', '.join(norms[:3])}, ...): pass "
                         f"--train-bn to continue it")
    for name, idx in layers.items():
        if name not in entries:
            continue
        real = task.real[idx].to(entries[name].mask_real.dtype)
        below = torch.nextafter(torch.tensor(threshold, dtype=real.dtype), torch.tensor(-math.inf, dtype=real.dtype))
        real = torch.where(real == threshold, below, real)  # theirs: 1 above the threshold; ours: at or above
        if scheme == "ternary":  # theirs: -1 below zero; ours: at or below -threshold
            real = torch.where(real < 0, torch.minimum(real, torch.tensor(-threshold, dtype=real.dtype)), real)
        entries[name].mask_real.copy_(real)
    head_name, head = get_classifier(model)
    weight, bias = task.classifier
    if tuple(head.weight.shape) != tuple(weight.shape):
        raise UsageError(f"--init-masks {path}: its classifier has {weight.shape[0]} classes, the dataset "
                         f"{head.weight.shape[0]}")
    head.weight.copy_(weight)
    if head.bias is not None and bias is not None:
        head.bias.copy_(bias)
    if train_bn:
        names = shared_module_names(tv, model)
        for idx, tensors in task.frozen.items():
            name = names[idx] if idx < len(names) else None
            module = model.get_submodule(name) if name else None
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for key, value in tensors.items():
                    if key != "num_batches_tracked" and hasattr(module, key):
                        getattr(module, key).copy_(value)
    return {"dataset": task.dataset, "epoch": _number(task.args, "epoch"), "source": str(path)}


def _number(args: dict, key: str):
    value = args.get(key)
    return value if isinstance(value, (int, float)) else None
