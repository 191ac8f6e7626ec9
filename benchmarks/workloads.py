"""The networks, batches and training steps that the benchmarks time.

Two workloads from the issue: WRN-28-4 (the decathlon backbone) on a batch of 32
64x64 images, and FCN-32s on VGG-16 on one 320x320 image. Weights are random (nothing can
be downloaded here); the cost of a step does not depend on the values.

Piggyback and finetuning are prepared from the same initial model, with the same
optimiser type and the same batch-norm mode, so the only difference between their steps
is the masking (eq. 4 in the forward pass, eq. 7 in the backward pass).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.masking import mask_parameters, masked_modules, piggyback, scheme_parameters, task_parameters

__all__ = ["Workload", "WORKLOADS", "get_workload", "prepare", "bench_optimizer",
           "timed_step", "masking_kernels", "set_random_masks",
           "decathlon_zero_fractions", "write_decathlon_mask_files"]


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], Tuple[torch.Tensor, torch.Tensor]]  # (batch size) -> (x, y)
    batch_size: int
    skip: Tuple[str, ...]  # the task's new layers, never masked
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    has_bn: bool


def _wrn28_4() -> nn.Module:
    from decathlon.networks import create_model
    return create_model("wrn28_4", 100)


def _wrn_batch(n: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, 100, (n,), generator=g)


def _fcn32s() -> nn.Module:
    from segmentation.model import build_fcn32s
    return build_fcn32s("vgg16", num_classes=21)


def _fcn_batch(n: int):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 21, (n, 320, 320), generator=g)
    y[:, :8] = 255  # a void border, as in VOC labels
    return torch.randn(n, 3, 320, 320, generator=g), y


def _fcn_skip() -> Tuple[str, ...]:
    from segmentation.model import NEW_LAYERS
    return tuple(NEW_LAYERS)


def _seg_loss(logits, y):
    return F.cross_entropy(logits, y, ignore_index=255)


def _mobilenet_v2() -> nn.Module:
    import torchvision
    return torchvision.models.mobilenet_v2(num_classes=10)


def _small_batch(n: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


WORKLOADS: Dict[str, Callable[[], Workload]] = {
    "wrn28_4": lambda: Workload("wrn28_4", "WRN-28-4, 64x64, batch 32", _wrn28_4, _wrn_batch, 32,
                                ("fc",), F.cross_entropy, True),
    "fcn32s": lambda: Workload("fcn32s", "FCN-32s (VGG-16), 320x320, batch 1", _fcn32s, _fcn_batch, 1,
                               _fcn_skip(), _seg_loss, False),
    # the transfer benchmark's setting: many small layers on small maps, where the
    # weight-sized work of masking weighs most against the convolutions
    "mobilenet_v2": lambda: Workload("mobilenet_v2", "MobileNetV2, 32x32, batch 32", _mobilenet_v2, _small_batch,
                                     32, ("classifier.1",), F.cross_entropy, True),
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()


def _bn_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def prepare(plain: nn.Module, method: str, workload: Workload, *, train_bn: bool,
            copy_model: bool = True, scheme: str = "binary") -> Tuple[nn.Module, List[nn.Parameter]]:
    """A model in train mode for ``method`` and the parameters its optimiser owns.

    piggyback: every conv/linear outside ``workload.skip`` masked with ``scheme``, backbone
    frozen; the optimiser owns the masks, the scheme's values beside them and the head.
    finetune: every parameter trains. ``train_bn=False`` keeps BN on its running
    statistics in both (piggyback's default); ``True`` uses batch statistics in both."""
    model = copy.deepcopy(plain) if copy_model else plain
    if method == "piggyback":
        piggyback(model, train_bn=train_bn, skip=workload.skip, scheme=scheme)
        params = mask_parameters(model) + scheme_parameters(model) + task_parameters(model)
        model.train()
    elif method == "finetune":
        # backbone weights train; the new layers keep their own setting (FCN's fixed
        # bilinear upsampling stays fixed, as it does under piggyback)
        for name, p in model.named_parameters():
            if not name.startswith(tuple(f"{s}." for s in workload.skip)):
                p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        if not train_bn:
            for m in _bn_layers(model):
                m.eval()
    else:
        raise ValueError(f"unknown method {method!r}; valid: piggyback, finetune")
    return model, params


def bench_optimizer(name: str, params: List[nn.Parameter], fused: bool = False) -> torch.optim.Optimizer:
    """The same optimiser type for both methods: Adam (the paper's piggyback optimiser)
    or SGD with momentum (the finetuning baselines'); torch's fused kernels when ``fused``,
    its default (foreach) implementation otherwise."""
    impl = {"fused": True} if fused else {}
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-4, **impl)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, **impl)
    raise ValueError(f"unknown optimizer {name!r}; valid: adam, sgd")


def timed_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor,
               loss_fn) -> Tuple[float, float, float]:
    """One training step with ``opt`` (one optimiser, or several: the training commands'
    groups); returns the seconds of (forward, backward, optimiser step)."""
    opts = list(opt.values()) if isinstance(opt, dict) else [opt]
    t0 = time.perf_counter()
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    for o in opts:
        o.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


@torch.no_grad()
def masking_kernels(model: nn.Module) -> Dict[str, Callable[[], None]]:
    """The elementwise work masking adds to a training step, over every masked layer,
    written several ways, for diagnosis: eq. 4 as a float mask times the weight, as one
    select (``common.masking.apply_mask``, what training runs) into a new tensor or into
    reused memory, and the eq. 7 product into a new tensor (what training runs) or in place. On large layers the difference
    between the forms is allocating and first touching fresh memory (page faults)."""
    from common.masking import apply_mask, binarize
    layers = [layer for _, layer in masked_modules(model)]
    grads = [torch.randn_like(layer.weight) for layer in layers]
    out = [torch.empty_like(layer.weight) for layer in layers]

    def float_mask():
        for layer in layers:
            layer.weight * binarize(layer.mask_real, layer.threshold, layer.scheme).to(layer.weight.dtype)

    def select_new():
        for layer in layers:
            apply_mask(layer.weight, layer.mask_real, layer.threshold, layer.scheme)

    def select_reused():
        for o, layer in zip(out, layers):
            torch.where(layer.mask_real >= layer.threshold, layer.weight, torch.zeros((), dtype=o.dtype), out=o)

    def eq7_new():
        for g, layer in zip(grads, layers):
            g * layer.weight

    def eq7_in_place():
        for g, o, layer in zip(grads, out, layers):
            torch.mul(g, layer.weight, out=o)  # same traffic as g.mul_(w), values kept finite

    return {"eq. 4: weight * float(mask_real >= threshold), new tensor": float_mask,
            "eq. 4: one select (apply_mask), new tensor": select_new,
            "eq. 4: one select (apply_mask), reused buffer": select_reused,
            "eq. 7: grad * weight, new tensor": eq7_new,
            "eq. 7: grad * weight, in place": eq7_in_place}


# how many leading weight dimensions share one random draw: every weight on its own,
# whole kernels (out, in), whole filters (out)
GRANULARITY = {"weight": None, "kernel": 2, "filter": 1}


@torch.no_grad()
def set_random_masks(model: nn.Module, zero_fraction: float, seed: int = 0, *,
                     scheme: str = "binary", granularity: str = "weight") -> None:
    """Give every masked layer a random mask with about ``zero_fraction`` zeros overall.

    Deeper layers get more zeros (a profile rising linearly with depth, the trend of the
    paper's Fig. 3), scaled so that the fraction over all weights is ``zero_fraction``.
    ``granularity`` switches weights off one by one, or whole kernels / filters at once.
    Signed schemes (ternary) split the non-zero entries evenly between +1 and -1."""
    from common.masking import set_binary_mask
    from common.schemes import get_scheme
    signed = get_scheme(scheme).signed
    layers = [layer for _, layer in masked_modules(model)]
    sizes = torch.tensor([float(layer.weight.numel()) for layer in layers])
    profile = 0.5 + torch.arange(len(layers), dtype=torch.float64) / max(1, len(layers) - 1)
    profile = profile * (sizes.sum() / (sizes * profile).sum())
    g = torch.Generator().manual_seed(seed)
    for layer, f in zip(layers, profile.tolist()):
        lead = GRANULARITY[granularity]
        shape = layer.weight.shape if lead is None else layer.weight.shape[:lead]
        u = torch.rand(shape, generator=g).reshape(tuple(shape) + (1,) * (layer.weight.dim() - len(shape)))
        mask = (u >= min(zero_fraction * f, 0.95)).to(torch.float32).expand(layer.weight.shape)
        if signed:
            mask = mask * torch.where(torch.rand(layer.weight.shape, generator=g) < 0.5, -1.0, 1.0)
        set_binary_mask(layer, mask)


def decathlon_zero_fractions() -> Dict[str, float]:
    """A zero fraction per decathlon mask task, spread over the 4.5-43 % range of the
    paper's Table 6 (the paper publishes no per-task decathlon sparsity)."""
    from decathlon.tasks import MASK_TASKS
    return {t: 0.05 + 0.35 * i / (len(MASK_TASKS) - 1) for i, t in enumerate(MASK_TASKS)}


def write_decathlon_mask_files(plain: nn.Module, directory, *, compress: bool = False,
                               scheme: str = "binary") -> Dict[str, Path]:
    """One mask file per decathlon task on the WRN backbone ``plain``: the task's own
    classifier size, random masks at :func:`decathlon_zero_fractions`. Returns the paths."""
    from common.maskfile import save_masks
    from common.heads import reset_classifier
    from decathlon.tasks import get_task
    paths = {}
    for i, (task, p) in enumerate(decathlon_zero_fractions().items()):
        model = copy.deepcopy(plain)
        reset_classifier(model, get_task(task).num_classes)
        piggyback(model, scheme=scheme, skip=("fc",))
        set_random_masks(model, p, seed=i, scheme=scheme)
        suffix = ("" if scheme == "binary" else f"-{scheme}") + ("-compressed" if compress else "")
        paths[task] = save_masks(model, Path(directory) / f"{task}{suffix}.safetensors",
                                 compress=compress, task=task, arch="wrn28_4")
    return paths


# The optimisers of the mask-scheme contenders (benchmarks.bench_training, benchmarks.gpu):
# Adam for the masks and for the head, the scheme's own optimiser for its values.
SCHEME_OPTIMIZERS = dict(optimizer="adam", lr=1e-4, weight_decay=0.0, head_optimizer="adam", head_lr=1e-3,
                         head_weight_decay=0.0, momentum=0.9)


def prepare_scheme(plain: nn.Module, workload: "Workload", scheme: str):
    """A copy of ``plain`` prepared for piggyback with mask scheme ``scheme`` as the training
    commands prepare it, in training mode; returns (model, prepared). Build its optimisers
    with :func:`scheme_optimizers` once the model is on its device."""
    import copy

    from common.methods import MaskSettings, get_method
    model = copy.deepcopy(plain)
    prepared = get_method("piggyback").prepare(model, head=workload.skip, masks=MaskSettings(scheme=scheme))
    return model.train(), prepared


def scheme_optimizers(prepared, scheme: str) -> Dict[str, torch.optim.Optimizer]:
    """The training commands' optimisers (``common.optimizers.build_optimizers``) for a model
    of :func:`prepare_scheme`, with :data:`SCHEME_OPTIMIZERS` and the scheme's defaults for
    its values."""
    from types import SimpleNamespace

    from common.optimizers import build_optimizers
    from common.schemes import get_scheme
    s = get_scheme(scheme)
    return build_optimizers(prepared, SimpleNamespace(**SCHEME_OPTIMIZERS, extras_optimizer=s.extras_optimizer,
                                                      extras_lr=s.extras_lr))
