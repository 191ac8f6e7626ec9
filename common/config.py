"""Run configurations: one frozen, typed record per command, built once at the entry point.

A command's configuration is a frozen dataclass whose fields are declared with
:func:`option`: the default, the help line, the flag group (``common``, ``masks``,
``optimisation``, ``data``, ``runtime``), the argparse type or choices, and whether the
field may change when a run is resumed. :func:`build_parser` makes the command line from
the fields, so a flag group is written once (the base classes below) and a pipeline only
adds its own fields.

:meth:`RunConfig.build` layers the values, each layer overriding the one before:

1. the fields' defaults (and the data-root environment variable of the command);
2. what the method, the recipe and the scheme give (optimizer, learning rates, mask
   settings), applied at the layer that names them;
3. ``--config FILE``: a run's ``config.json`` or a JSON/YAML file of field names;
4. the flags given on the command line.

A layer that names ``--method``, ``--recipe`` or ``--scheme`` sets again what those own,
unless that layer gives those fields itself: ``--config run/config.json --recipe paper``
trains with the paper's mask settings. Every rule is checked once, in :meth:`check` (the
base class's rules, then each pipeline's), and library code receives the frozen object.
``config.json`` is that object written out, with the values ``auto`` switches took under
``resolved``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from common.errors import UsageError

__all__ = ["option", "RunConfig", "FitConfig", "TrainConfig", "build_parser", "read_config_file", "config_record",
           "SWITCH_CHOICES", "COMPILE_CHOICES", "read_run_config", "PROVENANCE_KEYS", "RESOLVED_KEY", "GROUP_TITLES"]

SWITCH_CHOICES = ("auto", "on", "off")
COMPILE_CHOICES = ("auto", "on", "off", "cudagraphs")
RESOLVED_KEY = "resolved"
PROVENANCE_KEYS = ("git_commit", "torch_version", "command_line")
GROUP_TITLES = {"common": "run", "method": "method", "masks": "masks (piggyback)", "optimisation": "optimisation",
                "data": "data", "runtime": "runtime"}


def option(default: Any = None, help: str = "", *, group: str = "common", type: Optional[Callable] = None,
           choices: Optional[Sequence] = None, nargs: Optional[str] = None, metavar=None,
           flags: Optional[Sequence[str]] = None, resume: str = "fixed", path: bool = False,
           owner: Optional[Tuple[str, ...]] = None, cli: bool = True, default_text: Optional[str] = None):
    """A configuration field.

    ``resume``: ``fixed`` (a resumed run must have the same value), ``free`` (where and how
    fast the run goes: may change) or ``grow`` (may only grow: epochs). ``path``: made
    absolute when the configuration is built. ``owner``: the fields (``method``,
    ``recipe``, ``scheme``) whose value gives this one's default when it is left unset.
    ``default_text``: what the help says of the default (else the default itself)."""
    if group not in GROUP_TITLES:
        raise ValueError(f"unknown option group {group!r}")
    meta = dict(help=help, group=group, type=type, choices=tuple(choices) if choices else None, nargs=nargs,
                metavar=metavar, flags=tuple(flags) if flags else None, resume=resume, path=path,
                owner=tuple(owner or ()), cli=cli, default_text=default_text)
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def read_config_file(path) -> Dict[str, Any]:
    """The fields of a configuration file: a run's ``config.json`` (its ``resolved`` and
    provenance keys are left out) or a JSON or YAML mapping a user wrote."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), "
                                 f"or write the file as JSON") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (ValueError, Exception) as exc:  # json.JSONDecodeError, yaml.YAMLError
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"--config {path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} holds a {type(data).__name__}; expected a mapping of setting names to values")
    return {k: v for k, v in data.items() if k != RESOLVED_KEY and k not in PROVENANCE_KEYS}


@dataclass(frozen=True)
class RunConfig:
    """Fields and rules every command's configuration has (see the module docstring)."""

    # the command this configuration is for, e.g. "python -m decathlon.train"
    PROG: ClassVar[str] = ""
    DATA_ROOT_ENV: ClassVar[Optional[str]] = None
    # what --compile/--amp/--channels-last auto means for this command, stated once
    AUTO: ClassVar[Dict[str, str]] = {}

    data_root: Optional[str] = option(None, "folder holding the dataset", group="common", metavar="DIR",
                                      path=True, resume="free")
    out: str = option("runs/latest", "run folder for config.json, log.jsonl, checkpoints and results",
                      metavar="DIR", path=True, resume="free")
    epochs: int = option(30, "training epochs", type=int, resume="grow")
    batch_size: int = option(32, "examples per batch on each process", type=int)
    seed: int = option(0, "random seed of initialisation, data order and augmentation", type=int)
    device: str = option("auto", "where to run: auto|cpu|cuda|cuda:N; auto = CUDA when available, else the CPU",
                         group="runtime", metavar="DEV", resume="free")
    workers: Optional[int] = option(None, "DataLoader worker processes per training process, 0 loads in the "
                                    "main process", group="runtime", type=int, resume="free",
                                    default_text="auto: half the usable CPU cores, at most 8")
    threads: Optional[int] = option(None, "torch CPU threads of each process", group="runtime", type=int,
                                    resume="free", default_text="auto: OMP_NUM_THREADS when set, else the usable "
                                                                "CPU cores less the workers, at least 1")
    print_freq: int = option(50, "steps between progress lines and the loss checks that read the device",
                             group="runtime", type=int, resume="free")

    # ------------------------------------------------------------------ building

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        values = {f.name: f.default for f in fields(cls)}
        if cls.DATA_ROOT_ENV and os.environ.get(cls.DATA_ROOT_ENV):
            values["data_root"] = os.environ[cls.DATA_ROOT_ENV]
        return values

    @classmethod
    def derive(cls, values: Dict[str, Any]) -> Dict[str, Any]:
        """Fill the fields left unset (``None``) that the method, recipe or scheme give."""
        return values

    @classmethod
    def build(cls, *layers: Tuple[str, Mapping[str, Any]]):
        """The configuration from ``(source, values)`` layers over the defaults, later
        layers winning (module docstring); checked, frozen."""
        names = {f.name: f for f in fields(cls)}
        values = cls.defaults()
        for source, layer in layers:
            unknown = sorted(set(layer) - set(names))
            if unknown:
                raise UsageError(f"{source}: unknown setting(s) {', '.join(map(repr, unknown))} for {cls.PROG or cls.__name__}; "
                                 f"valid: {', '.join(names)}")
            named = {k for k in ("method", "recipe", "scheme") if k in layer}
            if named:
                for f in fields(cls):
                    if set(f.metadata["owner"]) & named and f.name not in layer:
                        values[f.name] = None
            for key, value in layer.items():
                values[key] = _coerce(names[key], value, source)
        values = cls.derive(values)
        for f in fields(cls):
            if f.metadata["path"] and values.get(f.name):
                values[f.name] = os.path.abspath(os.path.expanduser(str(values[f.name])))
        config = cls(**values)
        config.check()
        return config

    @classmethod
    def from_cli(cls, parser: argparse.ArgumentParser, argv=None):
        """Parse ``argv`` with ``parser`` (from :func:`build_parser`) and build the
        configuration: defaults, ``--config FILE``, then the flags given."""
        given = vars(parser.parse_args(argv))
        file = given.pop("config", None)
        layers = []
        if file is not None:
            layers.append((f"--config {file}", read_config_file(file)))
        layers.append(("the command line", given))
        return cls.build(*layers)

    def replace(self, **changes):
        """A copy with ``changes``, checked again."""
        return type(self).build(("replace()", {**self.as_dict(), **changes}))

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """Every rule on the values of this configuration (subclasses add theirs)."""
        for name in ("epochs", "batch_size", "print_freq"):
            _at_least(name, getattr(self, name), 1)
        for name in ("workers",):
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 0)
        if self.threads is not None:
            _at_least("threads", self.threads, 1)
        from common.cli import check_device_name
        check_device_name(self.device)

    # ------------------------------------------------------------------ records

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def resume_free(cls) -> List[str]:
        """The fields that may differ when a run is resumed (``epochs`` may only grow)."""
        return [f.name for f in fields(cls) if f.metadata["resume"] in ("free", "grow")]


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
    from common.runlog import RunDir
    run = RunDir(run_dir)
    if not run.file(run.CONFIG).is_file():
        return {}
    record = run.read_config()
    resolved = record.pop(RESOLVED_KEY, None) or {}
    return {**record, **{k: v for k, v in resolved.items() if v is not None}}


def _at_least(name: str, value, low) -> None:
    if value is None or value < low:
        raise UsageError(f"{_flag(name)} must be >= {low}, got {value}")


def _positive(name: str, value) -> None:
    if value is not None and not value > 0:
        raise UsageError(f"{_flag(name)} must be positive, got {value}")


def _non_negative(name: str, value) -> None:
    if value is not None and not value >= 0:
        raise UsageError(f"{_flag(name)} must be >= 0, got {value}")


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """A value from a file or the command line in the field's type."""
    meta = f.metadata
    if value is None:
        return None
    kind = meta["type"]
    if meta["nargs"]:
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{source}: {f.name} = {value!r}; expected a list")
        value = tuple(kind(v) if kind else v for v in value)
    elif kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{source}: {f.name} = {value!r}; expected true or false")
    elif kind is not None:
        try:
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = kind(value)
        except (TypeError, ValueError):
            raise UsageError(f"{source}: {f.name} = {value!r}; expected {getattr(kind, '__name__', kind)}") from None
    if meta["choices"] and value not in meta["choices"] and not meta["nargs"]:
        raise UsageError(f"{source}: {f.name} = {value!r}; expected one of {', '.join(map(str, meta['choices']))}")
    return value


# ---------------------------------------------------------------------------- parser

def _help(f: dataclasses.Field, choices_fn) -> str:
    meta = f.metadata
    text = meta["help"]
    if meta["default_text"] is not None:
        shown = meta["default_text"]
    elif isinstance(f.default, tuple):
        shown = " ".join(map(str, f.default)) or "none"
    elif f.default is None:
        shown = "none"
    elif f.default is True or f.default is False:
        shown = "on" if f.default else "off"
    else:
        shown = str(f.default)
    return f"{text} (default: {shown})".replace("%", "%%")


def build_parser(cls, description: str, *, epilog: Optional[str] = None, extra: Optional[Callable] = None,
                 choices: Optional[Mapping[str, Callable[[], Sequence[str]]]] = None) -> argparse.ArgumentParser:
    """The command line of configuration class ``cls``: ``--config FILE`` and one flag per
    field, in the field's group. Only the flags given reach the namespace, so a default
    never hides a value from ``--config``. ``choices`` gives fields whose valid values come
    from a registry at parse time (methods, schemes). ``extra(parser)`` adds flags that
    are not settings of the run (there are few)."""
    choices = {**REGISTRY_CHOICES, **getattr(cls, "CHOICES", {}), **(choices or {})}
    auto = "".join(f"\n  --{k.replace('_', '-')} auto: {v}" for k, v in cls.AUTO.items())
    if any(f.name == "scheme" and f.metadata["cli"] for f in fields(cls)):
        from common.schemes import SCHEMES
        auto += ("\n\nmask schemes (--scheme; their accuracy and step time against binary masks: BENCHMARKS.md):"
                 + "".join(f"\n  {name}: {scheme.summary}; stores {scheme.cost}"
                           + (f"; measured: {scheme.gain}" if scheme.gain else "") for name, scheme in SCHEMES.items()))
    from common.cli import Parser
    p = Parser(prog=cls.PROG, description=description, usage="%(prog)s [options]", argument_default=argparse.SUPPRESS,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=(("what auto means here:" if cls.AUTO else "") + auto + "\n" if auto else "") + (epilog or ""))
    p.add_argument("--config", metavar="FILE",
                   help="read the settings from FILE (a run's config.json, or a JSON/YAML mapping of setting "
                        "names to values); flags given beside it override it (default: none)")
    used = {f.metadata["group"] for f in fields(cls) if f.metadata["cli"]}
    groups = {name: p.add_argument_group(title) for name, title in GROUP_TITLES.items() if name in used}
    for f in fields(cls):
        meta = f.metadata
        if not meta["cli"]:
            continue
        g = groups[meta["group"]]
        flags = meta["flags"] or (_flag(f.name),)
        kwargs: Dict[str, Any] = dict(dest=f.name, help=_help(f, choices))
        valid = (choices or {}).get(f.name)
        if meta["type"] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if meta["type"] is not None:
                kwargs["type"] = meta["type"]
            if meta["nargs"]:
                kwargs["nargs"] = meta["nargs"]
            if valid is not None:
                kwargs["choices"] = list(valid())
            elif meta["choices"]:
                kwargs["choices"] = list(meta["choices"])
            if meta["metavar"] is not None:
                kwargs["metavar"] = meta["metavar"]
        g.add_argument(*flags, **kwargs)
    if extra is not None:
        extra(p)
    return p


# ------------------------------------------------------------------- training commands

def _method_names():
    from common.methods import METHODS
    return list(METHODS)


def _scheme_names():
    from common.schemes import scheme_names
    return scheme_names()


def _recipe_names():
    from common.recipes import RECIPES
    return sorted(RECIPES)


def _optimizer_names():
    from common.methods import OPTIMIZERS
    return list(OPTIMIZERS)


def _mask_init_names():
    from common.masking import MASK_INITS
    return sorted(MASK_INITS)


REGISTRY_CHOICES = {"method": _method_names, "scheme": _scheme_names, "recipe": _recipe_names,
                    "optimizer": _optimizer_names, "head_optimizer": _optimizer_names,
                    "extras_optimizer": _optimizer_names, "mask_init": _mask_init_names}
_MASK_FIELDS = ("threshold", "mask_init", "mask_scale", "mask_spread")


@dataclass(frozen=True)
class FitConfig(RunConfig):
    """Training a network: its architecture and starting weights, the optimizer of its
    weights, the learning-rate schedule and the runtime switches."""

    arch: Optional[str] = option(None, "network architecture", metavar="NAME")
    backbone: Optional[str] = option(None, "local file with the pretrained backbone weights; nothing is "
                                     "downloaded", metavar="PATH", path=True, resume="free")
    optimizer: Optional[str] = option(None, "optimizer of the masks / backbone weights", group="optimisation",
                                      owner=("method", "recipe"), default_text="from --recipe for piggyback, "
                                                                               "else per method")
    lr: Optional[float] = option(None, "learning rate of the masks / backbone weights", group="optimisation",
                                 type=float, owner=("method", "recipe"),
                                 default_text="from --recipe for piggyback, else per method")
    weight_decay: Optional[float] = option(None, "weight decay of the masks / backbone weights",
                                           group="optimisation", type=float, owner=("method",),
                                           default_text="per method")
    momentum: Optional[float] = option(None, "momentum of every SGD optimizer", group="optimisation", type=float,
                                       default_text="0.9")
    lr_steps: Optional[Tuple[int, ...]] = option((15,), "epochs after which every learning rate is multiplied by "
                                                 "--lr-gamma", group="optimisation", type=int, nargs="*",
                                                 metavar="EPOCH")
    lr_gamma: float = option(0.1, "learning-rate decay factor", group="optimisation", type=float)
    amp: str = option("auto", "bf16 autocast; bf16 trains faster on a GPU but cost accuracy on real images "
                      "(BENCHMARKS-gpu.md)", group="runtime", choices=SWITCH_CHOICES)
    channels_last: str = option("auto", "channels_last memory format", group="runtime", choices=SWITCH_CHOICES)
    compile: str = option("auto", "torch.compile the network once per run: on (default mode), cudagraphs "
                          "(mode reduce-overhead), off", group="runtime", choices=COMPILE_CHOICES, resume="free")

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
            _positive(name, getattr(self, name))
        for name in ("weight_decay", "momentum"):
            _non_negative(name, getattr(self, name))
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
        from common.cli import resolve_workers
        return resolve_workers(self.workers)


@dataclass(frozen=True)
class TrainConfig(FitConfig):
    """A training command: a method over a pretrained backbone, masks, two or three
    optimizer groups, a learning-rate schedule and the runtime switches."""

    # per-pipeline defaults of the methods: {method: {field: value}}
    METHOD_DEFAULTS: ClassVar[Dict[str, Dict[str, Any]]] = {}

    method: str = option("piggyback", "how the task is learned: piggyback (masks), finetune, feature "
                         "(classifier only) or scratch", group="method")
    scheme: Optional[str] = option(None, "mask scheme of piggyback, from the scheme registry "
                                   "(common.schemes); see the README's method section", group="masks",
                                   owner=("method",), default_text="binary for piggyback")
    recipe: Optional[str] = option(None, "mask recipe giving the defaults of the mask settings and of the "
                                   "masks' optimizer and learning rate (common.recipes)", group="masks",
                                   owner=("method",), default_text="default for piggyback")
    threshold: Optional[float] = option(None, "binarizer threshold tau of eq. 4", group="masks", type=float,
                                        owner=("method", "recipe"), default_text="from --recipe")
    mask_init: Optional[str] = option(None, "initialisation of the real-valued masks", group="masks",
                                      owner=("method", "recipe"), default_text="from --recipe")
    mask_scale: Optional[float] = option(None, "initial real-valued mask value", group="masks", type=float,
                                         owner=("method", "recipe"), default_text="from --recipe")
    mask_spread: Optional[float] = option(None, "half-width of the uniform spread around --mask-scale of "
                                          "--mask-init spread", group="masks", type=float,
                                          owner=("method", "recipe"), default_text="from --recipe")
    train_bn: bool = option(False, "task-specific batch-norm layers that train (saved with the mask); "
                            "piggyback and feature", group="masks", type=bool)
    head_optimizer: str = option("adam", "optimizer of the new layers and task batch-norm", group="optimisation")
    head_lr: float = option(1e-3, "learning rate of the new layers and task batch-norm", group="optimisation",
                            type=float)
    head_weight_decay: float = option(0.0, "weight decay of the new layers and task batch-norm",
                                      group="optimisation", type=float)
    extras_optimizer: Optional[str] = option(None, "optimizer of the scheme's trained values beside the mask "
                                             "(affine: a, b, c, d)", group="optimisation",
                                             owner=("method", "scheme"), default_text="per scheme")
    extras_lr: Optional[float] = option(None, "learning rate of the scheme's trained values beside the mask "
                                        "(affine: a and b at this rate, c and d at this rate times the RMS of "
                                        "their layer's frozen weights)", group="optimisation", type=float,
                                        owner=("method", "scheme"), default_text="per scheme")

    @classmethod
    def derive(cls, values):
        from common.methods import get_method
        from common.recipes import DEFAULT_RECIPE, get_recipe
        from common.schemes import DEFAULT_SCHEME, get_scheme
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
        from common.methods import get_method
        from common.schemes import get_scheme
        method = get_method(self.method)
        if self.train_bn and not method.supports_train_bn:
            raise UsageError(f"--train-bn: batch-norm layers already train with --method {method.name}")
        if not method.uses_masks:
            given = [_flag(k) for k in ("scheme", "recipe", *_MASK_FIELDS, "extras_optimizer", "extras_lr")
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
            _positive(name, getattr(self, name))
        for name in ("head_weight_decay", "mask_spread"):
            _non_negative(name, getattr(self, name))

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
        from common.methods import get_method
        return get_method(self.method).uses_masks

    def mask_settings(self):
        """``piggyback``'s mask keywords (None for methods that train no mask)."""
        from common.methods import MaskSettings
        if not self.uses_masks:
            return None
        return MaskSettings(scheme=self.scheme, threshold=self.threshold, mask_init=self.mask_init,
                            mask_scale=self.mask_scale, mask_spread=self.mask_spread)
