"""The training schema: the settings every training command shares, and the base of the
evaluation commands' settings, on the generic layer of :mod:`common.settings`.

* :class:`RunConfig`: where the data and the run folder are, epochs, batch size, seed,
  device, workers, threads, progress lines;
* :class:`FitConfig`: training a network: architecture, starting weights, the optimizer of
  its weights, the learning-rate schedule and the runtime switches;
* :class:`TrainConfig`: a method (piggyback or a baseline) over a pretrained backbone, the
  mask scheme and recipe, the optimizer groups of masks, new layers and scheme values;
* :class:`EvalConfig`: what every evaluation command shares (device, workers, batch size,
  compile).

The registries hand their names to the fields (``choices=method_names``), so ``--help`` and
the checks list what is registered when the command runs. A layer of values that names
``--method``, ``--recipe`` or ``--scheme`` sets again what those own, unless that layer
gives those fields itself: ``--config run/config.json --recipe paper`` trains with the
paper's mask settings. ``config.json`` is the frozen settings written out, with the values
``auto`` switches took under ``resolved``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

from common.cli import check_device_name, resolve_workers
from common.engine import EVAL_COMPILE_MODES
from common.errors import UsageError
from common.masking import mask_init_names
from common.methods import MaskSettings, get_method, method_names
from common.optimizers import optimizer_names
from common.recipes import DEFAULT_RECIPE, get_recipe, recipe_names
from common.schemes import DEFAULT_SCHEME, SCHEMES, get_scheme, scheme_names
from common.settings import (RESOLVED_KEY, SWITCH_CHOICES, Settings, at_least, non_negative, option,
                             positive, read_config_file)

__all__ = ["RunConfig", "FitConfig", "TrainConfig", "EvalConfig", "config_record", "read_run_config",
           "SWITCH_CHOICES", "COMPILE_CHOICES", "RESOLVED_KEY", "option", "read_config_file"]

COMPILE_CHOICES = ("auto", "on", "off", "cudagraphs")
_MASK_FIELDS = ("threshold", "mask_init", "mask_scale", "mask_spread")


@dataclass(frozen=True)
class RunConfig(Settings):
    """Fields and rules every training command has."""

    data_root: Optional[str] = option(None, "folder holding the dataset", group="common", metavar="DIR",
                                      path=True, resume="free")
    out: str = option("runs/latest", "run folder for config.json, log.jsonl, checkpoints and results",
                      metavar="DIR", path=True, resume="free")
    epochs: int = option(30, "training epochs", type=int, resume="grow")
    batch_size: int = option(32, "examples per batch on each process", type=int)
    seed: int = option(0, "random seed of initialisation, data order and augmentation", type=int)
    device: str = option("auto", "where to run: auto|cpu|cuda|cuda:N; auto = CUDA when available, else the CPU",
                         group="runtime", metavar="DEV", resume="free")
    workers: Optional[int] = option(None, "loader worker processes; 0 loads in the main process", group="runtime", type=int, resume="free",
                                    default_text="half the cores, at most 8")
    threads: Optional[int] = option(None, "torch CPU threads per process", group="runtime", type=int,
                                    resume="free", default_text="$OMP_NUM_THREADS, else the cores the workers leave")
    print_freq: int = option(50, "steps between progress lines and the loss checks that read the device",
                             group="runtime", type=int, resume="free")

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        super().check()
        for name in ("epochs", "batch_size", "print_freq"):
            at_least(name, getattr(self, name), 1)
        if self.workers is not None:
            at_least("workers", self.workers, 0)
        if self.threads is not None:
            at_least("threads", self.threads, 1)
        check_device_name(self.device)


def config_record(config: RunConfig, resolved: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What ``config.json`` holds: every field, and under ``resolved`` what the run derived
    (the values ``auto`` switches took, the resolved architecture, counts ...)."""
    record = config.as_dict()
    if resolved:
        record[RESOLVED_KEY] = dict(resolved)
    return record


def read_run_config(run_dir) -> Dict[str, Any]:
    """A run folder's ``config.json`` as one mapping: its fields, with what the run resolved
    (``resolved``) in place of ``auto``/unset values; ``{}`` when the folder has none."""
    from common.runlog import RunDir  # the run folder's owner reads its files
    run = RunDir(run_dir)
    if not run.file(run.CONFIG).is_file():
        return {}
    record = run.read_config()
    resolved = record.pop(RESOLVED_KEY, None) or {}
    return {**record, **{k: v for k, v in resolved.items() if v is not None}}


@dataclass(frozen=True)
class FitConfig(RunConfig):
    """Training a network: its architecture and starting weights, the optimizer of its
    weights, the learning-rate schedule and the runtime switches."""

    arch: Optional[str] = option(None, "network architecture", metavar="NAME")
    backbone: Optional[str] = option(None, "local file with the pretrained backbone weights; nothing is "
                                     "downloaded", metavar="PATH", path=True, resume="free")
    optimizer: Optional[str] = option(None, "optimizer of the masks / backbone weights", group="optimisation",
                                      choices=optimizer_names, owner=("method", "recipe"), default_text="per --recipe or --method")
    lr: Optional[float] = option(None, "learning rate of the masks / backbone weights", group="optimisation",
                                 type=float, owner=("method", "recipe"), default_text="per --recipe or --method")
    weight_decay: Optional[float] = option(None, "weight decay of the masks / backbone weights",
                                           group="optimisation", type=float, owner=("method",),
                                           default_text="per --method")
    momentum: Optional[float] = option(None, "momentum of every SGD optimizer", group="optimisation", type=float,
                                       default_text="0.9")
    lr_steps: Optional[Tuple[int, ...]] = option((15,), "epochs after which the learning rates are multiplied by "
                                                 "--lr-gamma", group="optimisation", type=int, nargs="*",
                                                 metavar="EPOCH")
    lr_gamma: float = option(0.1, "learning-rate decay factor", group="optimisation", type=float)
    amp: str = option("auto", "bf16 autocast (its cost in accuracy: BENCHMARKS-gpu.md)", group="runtime", choices=SWITCH_CHOICES)
    channels_last: str = option("auto", "channels_last memory format", group="runtime", choices=SWITCH_CHOICES)
    compile: str = option("auto", "torch.compile: on (default mode), cudagraphs (reduce-overhead) or off", group="runtime", choices=COMPILE_CHOICES, resume="free")

    # resolved values (config.json's "resolved") that may differ on resume
    RESOLVED_FREE: ClassVar[Tuple[str, ...]] = ("compile", "workers", "threads", "loader", "images_on_device")

    @classmethod
    def derive(cls, values):
        if values.get("momentum") is None:
            values["momentum"] = 0.9
        return values

    def check(self) -> None:
        super().check()
        for name in ("lr",):
            positive(name, getattr(self, name))
        for name in ("weight_decay", "momentum"):
            non_negative(name, getattr(self, name))
        if self.lr_gamma is None or not 0 < self.lr_gamma:
            raise UsageError(f"--lr-gamma must be positive, got {self.lr_gamma}")
        if self.lr_steps is not None and any(s < 1 for s in self.lr_steps):
            raise UsageError(f"--lr-steps must be epochs >= 1, got {' '.join(map(str, self.lr_steps))}")

    @classmethod
    def resume_free(cls) -> List[str]:
        return super().resume_free() + [f"{RESOLVED_KEY}.{k}" for k in cls.RESOLVED_FREE]

    @property
    def loader_workers(self) -> int:
        """``workers`` as resolved for this machine (:func:`common.cli.resolve_workers`)."""
        return resolve_workers(self.workers)


@dataclass(frozen=True)
class TrainConfig(FitConfig):
    """A training command: a method over a pretrained backbone, masks, two or three
    optimizer groups, a learning-rate schedule and the runtime switches."""

    # per-pipeline defaults of the methods: {method: {field: value}}
    METHOD_DEFAULTS: ClassVar[Dict[str, Dict[str, Any]]] = {}

    method: str = option("piggyback", "how the task is learned; feature trains the classifier only", group="method", choices=method_names)
    scheme: Optional[str] = option(None, "mask scheme of piggyback (listed below)", group="masks",
                                   choices=scheme_names, owner=("method",), default_text="binary")
    recipe: Optional[str] = option(None, "defaults of the mask settings and their optimizer", group="masks",
                                   choices=recipe_names, owner=("method",), default_text="default")
    threshold: Optional[float] = option(None, "binarizer threshold tau of eq. 4", group="masks", type=float,
                                        owner=("method", "recipe"), default_text="from --recipe")
    mask_init: Optional[str] = option(None, "initialisation of the real-valued masks", group="masks",
                                      choices=mask_init_names, owner=("method", "recipe"), default_text="from --recipe")
    mask_scale: Optional[float] = option(None, "initial real-valued mask value", group="masks", type=float,
                                         owner=("method", "recipe"), default_text="from --recipe")
    mask_spread: Optional[float] = option(None, "half-width of the uniform spread around --mask-scale of "
                                          "--mask-init spread", group="masks", type=float,
                                          owner=("method", "recipe"), default_text="from --recipe")
    train_bn: bool = option(False, "train task batch-norm layers (saved with the mask; "
                            "piggyback and feature)", group="masks", type=bool)
    head_optimizer: str = option("adam", "optimizer of the new layers and task batch-norm", group="optimisation",
                                 choices=optimizer_names)
    head_lr: float = option(1e-3, "learning rate of the new layers and task batch-norm", group="optimisation",
                            type=float)
    head_weight_decay: float = option(0.0, "weight decay of the new layers and task batch-norm",
                                      group="optimisation", type=float)
    extras_optimizer: Optional[str] = option(None, "optimizer of the scheme's values beside the mask "
                                             "(affine: a-d)", group="optimisation", choices=optimizer_names,
                                             owner=("method", "scheme"), default_text="per scheme")
    extras_lr: Optional[float] = option(None, "learning rate of the scheme's values beside the mask", group="optimisation", type=float,
                                        owner=("method", "scheme"), default_text="per scheme")

    @classmethod
    def apply_layer(cls, values, layer):
        named = {k for k in ("method", "recipe", "scheme") if k in layer}
        if named:
            for f in fields(cls):
                if set(f.metadata["owner"]) & named and f.name not in layer:
                    values[f.name] = None

    @classmethod
    def epilog(cls) -> str:
        schemes = "".join(f"\n  {name}: {scheme.summary}; stores {scheme.cost}" for name, scheme in SCHEMES.items())
        return super().epilog() + "\nmask schemes (--scheme; measured accuracy and speed: BENCHMARKS.md):" + \
            schemes + "\n"

    @classmethod
    def derive(cls, values):
        method = get_method(values["method"])
        own = dict(cls.METHOD_DEFAULTS.get(method.name, {}))
        if method.uses_masks:
            values["recipe"] = values["recipe"] or DEFAULT_RECIPE
            values["scheme"] = values["scheme"] or DEFAULT_SCHEME
            recipe = get_recipe(values["recipe"])
            scheme = get_scheme(values["scheme"])
            own = {"optimizer": recipe.mask_optimizer, "lr": recipe.mask_lr, "weight_decay": method.weight_decay,
                   **recipe.mask_options(), **own}
            if scheme.extras:
                own.setdefault("extras_optimizer", scheme.extras_optimizer)
                own.setdefault("extras_lr", scheme.extras_lr)
        else:
            own = {"optimizer": method.optimizer, "lr": method.lr, "weight_decay": method.weight_decay, **own}
        for key, value in own.items():
            if values.get(key) is None:
                values[key] = value
        return super().derive(values)

    def check(self) -> None:
        super().check()
        method = get_method(self.method)
        if self.train_bn and not method.supports_train_bn:
            raise UsageError(f"--train-bn: batch-norm layers already train with --method {method.name}")
        if not method.uses_masks:
            given = ["--" + k.replace("_", "-") for k in ("scheme", "recipe", *_MASK_FIELDS, "extras_optimizer", "extras_lr")
                     if getattr(self, k) is not None]
            if given:
                raise UsageError(f"{', '.join(given)} only apply to --method piggyback (now {method.name})")
        else:
            scheme = get_scheme(self.scheme)
            scheme.check_threshold(self.threshold)
            if not scheme.extras and (self.extras_optimizer is not None or self.extras_lr is not None):
                raise UsageError(f"--extras-optimizer/--extras-lr: the {scheme.name} scheme trains no values "
                                 f"beside the mask")
        if not method.uses_masks and method.optimizer is None and not self.METHOD_DEFAULTS.get(method.name) \
                and (self.optimizer is not None or self.lr is not None):
            raise UsageError(f"--method {method.name} trains only the new layers: use --head-lr/--head-optimizer, "
                             f"not --optimizer/--lr")
        if method.needs_backbone and not self.backbone and self.needs_backbone_file():
            raise UsageError(f"--method {method.name} needs {self.backbone_flag()} ({self.backbone_help()})")
        if not method.needs_backbone and self.backbone:
            raise UsageError(f"--method {method.name} starts from random weights; drop {self.backbone_flag()}")
        for name in ("head_lr", "threshold", "mask_scale", "extras_lr"):
            positive(name, getattr(self, name))
        for name in ("head_weight_decay", "mask_spread"):
            non_negative(name, getattr(self, name))

    @classmethod
    def needs_backbone_file(cls) -> bool:
        """Whether a method that starts from pretrained weights needs the backbone flag
        (not when the pipeline has a default source of its own)."""
        return True

    @classmethod
    def backbone_flag(cls) -> str:
        return "--backbone"

    @classmethod
    def backbone_help(cls) -> str:
        return "a local file of pretrained weights"

    @property
    def uses_masks(self) -> bool:
        return get_method(self.method).uses_masks

    def mask_settings(self):
        """``piggyback``'s mask keywords (None for methods that train no mask)."""
        if not self.uses_masks:
            return None
        return MaskSettings(scheme=self.scheme, threshold=self.threshold, mask_init=self.mask_init,
                            mask_scale=self.mask_scale, mask_spread=self.mask_spread)


@dataclass(frozen=True)
class EvalConfig(Settings):
    """What every evaluation command shares: where it runs, how it loads and whether it
    compiles the network."""

    batch_size: int = option(64, "images per batch", type=int)
    workers: Optional[int] = option(None, "loader worker processes; 0 loads in the main process", group="runtime",
                                    type=int, default_text="half the cores, at most 8")
    device: str = option("auto", "where to run: auto|cpu|cuda|cuda:N; auto = CUDA when available, else the CPU",
                         group="runtime", metavar="DEV")
    compile: str = option("auto", "torch.compile: on, cudagraphs or off; auto = off, as one pass rarely pays it back", group="runtime", choices=tuple(EVAL_COMPILE_MODES))

    def check(self) -> None:
        super().check()
        at_least("batch_size", self.batch_size, 1)
        if self.workers is not None:
            at_least("workers", self.workers, 0)
        check_device_name(self.device)
