"""How a command is declared: one frozen, typed record of settings, built once at the entry
point, whatever the command (training, evaluation, scoring, conversion, benchmarks).

A command's settings are a frozen dataclass deriving from :class:`Settings` whose fields are
declared with :func:`option`: the default, the help line, the flag group, the argparse type
or choices (a sequence, or a function that a registry hands over and that is asked at
parse time), whether the field is positional, and whether it may change when a run is
resumed. :meth:`Settings.parser` makes the command line from the fields, so every command
takes ``--config FILE``, prints one help style and validates in one place
(:meth:`Settings.check`).

:meth:`Settings.build` layers the values, each layer overriding the one before:

1. the fields' defaults (and the data-root environment variable of the command);
2. what :meth:`Settings.derive` fills in from other fields (a training command: what the
   method, recipe and scheme give);
3. ``--config FILE``: a run's ``config.json`` or a JSON/YAML file of setting names (each
   field's own name, or the name of any of its flags);
4. the flags given on the command line.

Library code receives the frozen object, never an argparse namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import textwrap
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from common.errors import UsageError

__all__ = ["option", "Settings", "read_config_file", "RESOLVED_KEY", "PROVENANCE_KEYS", "GROUP_TITLES",
           "SWITCH_CHOICES", "ChoiceSource"]

SWITCH_CHOICES = ("auto", "on", "off")
RESOLVED_KEY = "resolved"
PROVENANCE_KEYS = ("git_commit", "torch_version", "command_line")
GROUP_TITLES = {"input": "input", "common": "run", "method": "method", "masks": "masks (piggyback)",
                "optimisation": "optimisation", "data": "data", "runtime": "runtime"}
ChoiceSource = Union[Sequence[str], Callable[[], Sequence[str]]]
_NOT_ADDED = object()


def option(default: Any = None, help: str = "", *, group: str = "common", type: Optional[Callable] = None,
           choices: Optional[ChoiceSource] = None, nargs: Optional[str] = None, metavar=None,
           flags: Optional[Sequence[str]] = None, resume: str = "fixed", path: bool = False,
           owner: Optional[Tuple[str, ...]] = None, cli: bool = True, default_text: Optional[str] = None,
           positional: bool = False, absent: Any = _NOT_ADDED):
    """A setting.

    ``choices``: the valid values, or a function returning them (a registry's names,
    asked when the command line is built and when a value is checked). ``resume``:
    ``fixed`` (a resumed run must have the same value), ``free`` (where and how fast the
    run goes: may change) or ``grow`` (may only grow: epochs). ``path``: made absolute when
    the settings are built. ``owner``: the fields (``method``, ``recipe``, ``scheme``) whose
    value gives this one's default when it is left unset. ``default_text``: what the help
    says of the default (else the default itself). ``positional``: an argument without a
    flag (it may also come from ``--config``). ``absent``: for a setting added after runs
    were written, the value that means what those runs did, so that they still resume."""
    if group not in GROUP_TITLES:
        raise ValueError(f"unknown option group {group!r}")
    if choices is not None and not callable(choices):
        choices = tuple(choices)
    meta = dict(help=help, group=group, type=type, choices=choices, nargs=nargs, metavar=metavar,
                flags=tuple(flags) if flags else None, resume=resume, path=path, owner=tuple(owner or ()), cli=cli,
                default_text=default_text, positional=positional, absent=absent)
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choices(f: dataclasses.Field) -> Optional[Tuple[Any, ...]]:
    found = f.metadata["choices"]
    return tuple(found()) if callable(found) else found


def read_config_file(path) -> Dict[str, Any]:
    """The settings of a configuration file: a run's ``config.json`` (its ``resolved`` and
    provenance keys are left out) or a JSON or YAML mapping a user wrote."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    text = path.read_text(encoding="utf-8")
    try:
        if yaml_file:
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
        raise UsageError(f"--config {path} is not valid {'YAML' if yaml_file else 'JSON'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} holds a {type(data).__name__}; expected a mapping of setting names to values")
    return {k: v for k, v in data.items() if k != RESOLVED_KEY and k not in PROVENANCE_KEYS}


@dataclass(frozen=True)
class Settings:
    """A command's settings (see the module docstring)."""

    PROG: ClassVar[str] = ""  # e.g. "python -m decathlon.train"
    DESCRIPTION: ClassVar[str] = ""
    DATA_ROOT_ENV: ClassVar[Optional[str]] = None
    # what an ``auto`` value means for this command, stated once
    AUTO: ClassVar[Dict[str, str]] = {}

    # ------------------------------------------------------------------ building

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        values = {f.name: f.default for f in fields(cls)}
        if cls.DATA_ROOT_ENV and "data_root" in values and os.environ.get(cls.DATA_ROOT_ENV):
            values["data_root"] = os.environ[cls.DATA_ROOT_ENV]
        return values

    @classmethod
    def derive(cls, values: Dict[str, Any]) -> Dict[str, Any]:
        """Fill the fields left unset (``None``) that other fields give."""
        return values

    @classmethod
    def aliases(cls) -> Dict[str, str]:
        """{name a file may use: field name}: each field's flags without their dashes, so a
        configuration file may name a setting as its flag does (``weights``, ``batch-size``)."""
        out = {}
        for f in fields(cls):
            for flag in f.metadata["flags"] or ():
                bare = flag.lstrip("-")
                out[bare] = out[bare.replace("-", "_")] = f.name
        return out

    @classmethod
    def _layer_values(cls, source: str, layer: Mapping[str, Any], names) -> Dict[str, Any]:
        aliases = cls.aliases()
        out = {}
        for key, value in layer.items():
            bare = str(key).lstrip("-").replace("-", "_")
            name = key if key in names else bare if bare in names else aliases.get(str(key).lstrip("-"), aliases.get(bare))
            if name is None:
                raise UsageError(f"{source}: unknown setting(s) {key!r} for {cls.PROG or cls.__name__}; valid: "
                                 f"{', '.join(names)}")
            out[name] = value
        return out

    @classmethod
    def build(cls, *layers: Tuple[str, Mapping[str, Any]]):
        """The settings from ``(source, values)`` layers over the defaults, later layers
        winning (module docstring); checked, frozen."""
        names = {f.name: f for f in fields(cls)}
        values = {k: _coerce(names[k], v, "the defaults") for k, v in cls.defaults().items()}
        for source, layer in layers:
            layer = cls._layer_values(source, layer, names)
            cls.apply_layer(values, layer)
            for key, value in layer.items():
                values[key] = _coerce(names[key], value, source)
        values = cls.derive(values)
        for f in fields(cls):
            if f.metadata["path"] and values.get(f.name):
                values[f.name] = os.path.abspath(os.path.expanduser(str(values[f.name])))
        settings = cls(**values)
        settings.check()
        return settings

    @classmethod
    def apply_layer(cls, values: Dict[str, Any], layer: Mapping[str, Any]) -> None:
        """What a layer changes beyond its own values (a training command: a layer naming
        ``--method`` resets the settings the method owns)."""

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        """The command line of these settings (see :func:`build_parser`)."""
        return build_parser(cls)

    @classmethod
    def from_cli(cls, argv=None):
        """Parse ``argv`` and build the settings: defaults, ``--config FILE``, then the
        flags given."""
        given = vars(cls.parser().parse_args(argv))
        file = given.pop("config", None)
        layers = []
        if file is not None:
            layers.append((f"--config {file}", read_config_file(file)))
        layers.append(("the command line", given))
        return cls.build(*layers)

    @classmethod
    def run(cls, main: Callable[[Any], Any], argv=None) -> int:
        """Build the settings from ``argv`` and run ``main(settings)``; the toolkit's errors
        end as one line (:func:`common.cli.guarded`)."""
        from common.cli import guarded
        return guarded(cls.PROG, lambda: main(cls.from_cli(argv)))

    def replace(self, **changes):
        """A copy with ``changes``, checked again."""
        return type(self).build(("replace()", {**self.as_dict(), **changes}))

    # ------------------------------------------------------------------ checks

    def check(self) -> None:
        """Every rule on the values (subclasses add theirs); positional settings are
        required."""
        for f in fields(self):
            if f.metadata["positional"] and getattr(self, f.name) is None:
                metavar = f.metadata["metavar"] or f.name.upper()
                raise UsageError(f"{metavar} is required: {f.metadata['help']}")

    # ------------------------------------------------------------------ records

    def as_dict(self) -> Dict[str, Any]:
        """The settings as JSON-friendly values (tuples as lists, paths as strings)."""
        def plain(v):
            if isinstance(v, tuple):
                return [plain(x) for x in v]
            return os.fspath(v) if isinstance(v, os.PathLike) else v
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def resume_free(cls) -> List[str]:
        """The fields that may differ when a run is resumed (``epochs`` may only grow)."""
        return [f.name for f in fields(cls) if f.metadata["resume"] in ("free", "grow")]

    # what runs written before a resolved value was recorded did: {key: value}
    RESOLVED_ABSENT: ClassVar[Dict[str, Any]] = {}

    @classmethod
    def absent_settings(cls) -> Dict[str, Any]:
        """{setting: value} for settings added after runs were written: a run's record that
        lacks one resumes as if it held this value (``resolved.KEY`` for resolved ones)."""
        out = {f.name: f.metadata["absent"] for f in fields(cls) if f.metadata["absent"] is not _NOT_ADDED}
        out.update({f"{RESOLVED_KEY}.{k}": v for k, v in cls.RESOLVED_ABSENT.items()})
        return out

    @classmethod
    def epilog(cls) -> str:
        """Text after the flags in ``--help``: what ``auto`` means here."""
        if not cls.AUTO:
            return ""
        return "what auto means here:" + "".join(f"\n  {_flag(k)} auto: {v}" for k, v in cls.AUTO.items()) + "\n"


def at_least(name: str, value, low) -> None:
    if value is None or value < low:
        raise UsageError(f"{_flag(name)} must be >= {low}, got {value}")


def positive(name: str, value) -> None:
    if value is not None and not value > 0:
        raise UsageError(f"{_flag(name)} must be positive, got {value}")


def non_negative(name: str, value) -> None:
    if value is not None and not value >= 0:
        raise UsageError(f"{_flag(name)} must be >= 0, got {value}")


_YAML_SWITCHES = {True: "on", False: "off"}


def _converted(kind: Callable, value: Any) -> Any:
    # a parser of the field's own (not a plain type) turns strings into values once: the
    # command line has already applied it
    if kind not in (int, float, str) and not isinstance(value, str):
        return value
    return kind(value)


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """A value from a file or the command line in the field's type."""
    meta = f.metadata
    if value is None:
        return None
    kind = meta["type"]
    choices = _choices(f)
    if meta["nargs"]:
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{source}: {f.name} = {value!r}; expected a list")
        try:
            value = tuple(_converted(kind, v) if kind else v for v in value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UsageError(f"{source}: {f.name} = {value!r}; expected a list of "
                             f"{getattr(kind, '__name__', kind)}") from None
    elif kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{source}: {f.name} = {value!r}; expected true or false")
    else:
        if isinstance(value, bool) and choices and set(_YAML_SWITCHES.values()) <= set(choices):
            value = _YAML_SWITCHES[value]  # YAML 1.1 reads an unquoted on/off as true/false
        if kind is not None:
            try:
                if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
                    raise ValueError
                value = _converted(kind, value)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise UsageError(f"{source}: {f.name} = {value!r}; expected "
                                 f"{getattr(kind, '__name__', kind)}") from None
    if choices and any(v not in choices for v in (value if meta["nargs"] else (value,))):
        raise UsageError(f"{source}: {f.name} = {value!r}; expected {'values' if meta['nargs'] else 'one'} of "
                         f"{', '.join(map(str, choices))}")
    return value


# ---------------------------------------------------------------------------- parser

def _help(f: dataclasses.Field) -> str:
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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help entries start in column 26, so that an option with a short metavar keeps its
    text on its own line; descriptions and epilogs keep their line breaks."""

    def __init__(self, prog, indent_increment=2, max_help_position=26, width=None):
        super().__init__(prog, indent_increment, max_help_position, width)

    def _fill_text(self, text, width, indent):
        # each line wrapped to the terminal, continuation lines indented under it
        out = []
        for line in text.splitlines():
            lead = " " * (len(line) - len(line.lstrip()))
            out.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent + lead + "    ")
                       if line.strip() else "")
        return "\n".join(out)


def _metavar(f: dataclasses.Field, flag: str) -> Optional[str]:
    """A short metavar (``N`` for a count, ``X`` for a number) where the argparse default,
    the field's name in capitals, would push the help text to the next line."""
    meta = f.metadata
    if meta["metavar"] is not None or meta["type"] not in (int, float):
        return meta["metavar"]
    if len(flag) + 1 + len(f.name) <= 20:
        return None
    return "N" if meta["type"] is int else "X"


def build_parser(cls) -> argparse.ArgumentParser:
    """The command line of settings class ``cls``: ``--config FILE`` and one argument per
    field, in the field's group. Only the arguments given reach the namespace, so a
    default never hides a value from ``--config``."""
    from common.cli import Parser
    positional = [f for f in fields(cls) if f.metadata["cli"] and f.metadata["positional"]]
    usage = "%(prog)s " + "".join(f"{f.metadata['metavar'] or f.name.upper()} " for f in positional) + "[options]"
    p = Parser(prog=cls.PROG, description=cls.DESCRIPTION, usage=usage, argument_default=argparse.SUPPRESS,
               formatter_class=_HelpFormatter, epilog=cls.epilog() or None)
    p.add_argument("--config", metavar="FILE",
                   help="settings from a run's config.json or a JSON/YAML file; flags given override "
                        "them (default: none)")
    used = {f.metadata["group"] for f in fields(cls) if f.metadata["cli"] and not f.metadata["positional"]}
    groups = {name: p.add_argument_group(title) for name, title in GROUP_TITLES.items() if name in used}
    for f in fields(cls):
        meta = f.metadata
        if not meta["cli"]:
            continue
        kwargs: Dict[str, Any] = dict(help=_help(f))
        choices = _choices(f)
        if meta["positional"]:
            kwargs.update(nargs="?", metavar=meta["metavar"] or f.name.upper())
            if meta["type"] is not None:
                kwargs["type"] = meta["type"]
            p.add_argument(f.name, **kwargs)
            continue
        kwargs["dest"] = f.name
        if meta["type"] is bool:
            if any(flag.startswith("--no-") for flag in (meta["flags"] or (_flag(f.name),))):
                raise ValueError(f"on/off setting {f.name!r}: name it positively (its flag gets a --no- form)")
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if meta["type"] is not None:
                kwargs["type"] = meta["type"]
            if meta["nargs"]:
                kwargs["nargs"] = meta["nargs"]
            if choices:
                kwargs["choices"] = list(choices)
            metavar = _metavar(f, (meta["flags"] or (_flag(f.name),))[0])
            if metavar is not None:
                kwargs["metavar"] = metavar
        groups[meta["group"]].add_argument(*(meta["flags"] or (_flag(f.name),)), **kwargs)
    return p
