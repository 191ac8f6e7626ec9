"""Weights trained elsewhere, in this toolkit's decathlon networks: pure functions from a
state dict to a state dict, and the load that reports what did not match.

* Wide ResNets of the two common code styles (module style ``block1.layer.0.conv1``,
  functional style ``group0.block0.conv0``): :func:`remap_external_state_dict`, then
  :func:`load_external_weights`.
* The decathlon's ResNet-26 as its authors' code names it (``pre_layers_conv.conv``,
  ``layer1.0.conv1.bns.0``, ``layer1.0.conv2.1.conv``, ``end_bns.0.0``, ``linears.0``; the
  ``t`` in ``bns.{t}`` is the task), with or without residual adapters, from the pickled
  model object of the residual adapters' ``.t7`` files or from a state dict:
  :func:`resnet26_from_state_dict` builds the network the file describes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from common.errors import WeightsFileError
from common.heads import get_classifier
from decathlon.networks import ResNet26

__all__ = ["remap_external_state_dict", "load_external_weights", "LoadReport", "is_resnet26_layout",
           "resnet26_from_state_dict", "strip_prefix"]

StateDict = Dict[str, torch.Tensor]


def strip_prefix(sd: StateDict) -> StateDict:
    """Without DataParallel's ``module.`` prefix, when every key has it."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


# ---------------------------------------------------------------- wide ResNets
# Renaming rules for the two common wide-ResNet code bases: (pattern, replacement).
_KEY_RULES: List[Tuple[str, str]] = [
    (r"^(module|model|net)\.", ""),  # DataParallel / wrapper prefixes
    # Module-style WRN: conv1, block{g}.layer.{i}.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc
    (r"^block([123])\.layer\.(\d+)\.convShortcut\.", r"layer\1.\2.shortcut."),
    (r"^block([123])\.layer\.(\d+)\.", r"layer\1.\2."),
    (r"^bn1\.", "bn."),
    # Functional-style WRN: conv0, group{g}.block{i}.{conv0,conv1,bn0,bn1,convdim}, bn, fc
    (r"^conv0(\.weight)?$", "conv1.weight"),
    (r"^group(\d)\.block(\d+)\.convdim(\.weight)?$", "SHORTCUT:\\1.\\2"),
    (r"^group(\d)\.block(\d+)\.conv(\d)(\.weight)?$", "CONV:\\1.\\2.\\3"),
    (r"^group(\d)\.block(\d+)\.bn(\d)\.", "BN:\\1.\\2.\\3:"),
]


def _finish(key: str) -> str:
    # Zero-based group / layer numbers of the functional style become this model's names.
    m = re.match(r"^(SHORTCUT|CONV|BN):(\d)\.(\d+)(?:\.(\d))?:?(.*)$", key)
    if not m:
        return key
    kind, g, b, j, rest = m.groups()
    base = f"layer{int(g) + 1}.{b}."
    if kind == "SHORTCUT":
        return base + "shortcut.weight"
    if kind == "CONV":
        return base + f"conv{int(j) + 1}.weight"
    return base + f"bn{int(j) + 1}.{rest}"


def remap_external_state_dict(state_dict: StateDict) -> StateDict:
    """Rename the keys of an external pre-activation WRN checkpoint to this toolkit's names.

    Pure: returns a new dict with the same tensors.  Keys no rule recognises pass through
    unchanged (and are then reported as unexpected by :func:`load_external_weights`).
    """
    out = {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _KEY_RULES:
            new = re.sub(pattern, repl, new)
        out[_finish(new)] = value
    return out


def _key_summary(keys, limit: int = 4) -> str:
    """``n keys ['a', 'b', ...] and m more``: a few names instead of all of them."""
    keys = list(keys)
    if len(keys) <= limit + 1:
        return repr(keys)
    return f"{len(keys)} keys {keys[:limit]!r} and {len(keys) - limit} more"


@dataclass
class LoadReport:
    """What an import matched: model keys left unset, file keys left unused, and keys
    whose shapes disagree (``{key: (file shape, model shape)}``)."""

    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    mismatched: Dict[str, Tuple[tuple, tuple]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line; long key lists are cut to a count and a few names."""
        shapes = [f"{k}: file {a} vs model {b}" for k, (a, b) in self.mismatched.items()]
        return (f"missing from the file: {_key_summary(self.missing) if self.missing else 'none'}; "
                f"unused file keys: {_key_summary(self.unexpected) if self.unexpected else 'none'}; "
                f"shape mismatches: {_key_summary(shapes, 3) if shapes else 'none'}")


def load_external_weights(model: nn.Module, state_dict: StateDict, ignore: Optional[Tuple[str, ...]] = None,
                          source: str = "external weights") -> LoadReport:
    """Load an external WRN state dict into ``model`` through the key mapping.

    Keys starting with an ``ignore`` prefix (default: the classifier, replaced for every
    task) may be missing or of another shape.  Any other unmatched key raises
    :class:`WeightsFileError`, naming a few of them and their counts; ``source`` (e.g. the
    file name) starts the message.
    """
    if isinstance(state_dict.get("state_dict"), dict):  # a training checkpoint around it
        state_dict = state_dict["state_dict"]
    if ignore is None:
        ignore = (get_classifier(model)[0] + ".",)
    mapped = remap_external_state_dict(state_dict)
    own = model.state_dict()
    report = LoadReport()
    usable = {}
    for key, value in mapped.items():
        if key not in own or not isinstance(value, torch.Tensor):
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched[key] = (tuple(value.shape), tuple(own[key].shape))
        else:
            usable[key] = value
    report.missing = sorted(k for k in own if k not in usable and k not in report.mismatched)
    report.unexpected.sort()

    def fatal(k: str) -> bool:
        return not k.startswith(ignore) and not k.endswith("num_batches_tracked")

    fatal_missing = [k for k in report.missing if fatal(k)]
    if fatal_missing or report.unexpected or any(map(fatal, report.mismatched)):
        if len(fatal_missing) == len([k for k in own if fatal(k)]):
            hint = ("; not one key fits: expected a pre-activation WRN state dict "
                    "(keys like conv1.weight, layer1.0.conv1.weight, bn.weight)")
        else:
            hint = ""
        raise WeightsFileError(f"{source} do not fit {type(model).__name__}: {report.describe()}{hint}")
    model.load_state_dict(usable, strict=False)
    return report


# ---------------------------------------------------------------- the decathlon ResNet-26

_RA_UNIT = re.compile(r"^(pre_layers_conv|layer(\d)\.(\d+)\.conv1|layer(\d)\.(\d+)\.conv2\.1)\.(.+)$")
_OWN_BLOCK = re.compile(r"^layer(\d)\.(\d+)\.")


def is_resnet26_layout(sd: StateDict) -> bool:
    """Whether a state dict holds a ResNet-26: the residual adapters' key names, or this
    toolkit's (a stem BN ``bn1``, a final BN ``bn`` and blocks without a projection shortcut)."""
    sd = strip_prefix(sd)
    if any(k.startswith(("pre_layers_conv.", "end_bns.", "linears.")) for k in sd):
        return True
    return {"bn1.weight", "bn.weight", "layer1.0.bn2.weight"} <= set(sd) and not any(".shortcut." in k for k in sd)


def _tasks(sd: StateDict) -> List[int]:
    return sorted({int(m.group(1)) for k in sd for m in [re.match(r"^linears\.(\d+)\.weight$", k)] if m})


def _choose_task(sd: StateDict, source: str) -> int:
    tasks = _tasks(sd)
    if not tasks:
        raise WeightsFileError(f"{source} holds a ResNet-26 without a classifier (no linears.{{t}}.weight)")
    if len(tasks) == 1:
        return tasks[0]
    sizes = {t: int(sd[f"linears.{t}.weight"].shape[0]) for t in tasks}
    imagenet = [t for t, n in sizes.items() if n == 1000]
    if len(imagenet) == 1:
        return imagenet[0]
    raise WeightsFileError(f"{source} holds a ResNet-26 of {len(tasks)} tasks (classes per task: {sizes}) and no "
                           f"single 1000-class ImageNet task; pass the ImageNet network's own file")


def _unit_target(m: re.Match) -> Tuple[str, int]:
    """(prefix in this toolkit's network, 1 or 2) of one of the authors' conv_task units."""
    if m.group(1) == "pre_layers_conv":
        return "", 1
    if m.group(2):
        return f"layer{m.group(2)}.{m.group(3)}.", 1
    return f"layer{m.group(4)}.{m.group(5)}.", 2


def _ra_to_own(sd: StateDict, task: int, source: str) -> Tuple[StateDict, Dict[str, str], List[str]]:
    """(this toolkit's state dict, adapter kind per adapted conv, keys of other tasks left out)."""
    out: StateDict = {}
    adapters: Dict[str, str] = {}
    others: List[str] = []
    t = str(task)
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        m = _RA_UNIT.match(key)
        if m:
            prefix, k = _unit_target(m)
            rest = m.group(6)
            parts = rest.split(".")
            if rest == "conv.weight":
                out[f"{prefix}conv{k}.weight"] = value
                continue
            if parts[0] in ("bns", "parallel_conv") and parts[1] != t:
                others.append(key)
                continue
            if parts[0] == "parallel_conv" and parts[2:] == ["conv", "weight"]:
                out[f"{prefix}adapter{k}.conv.weight"] = value
                adapters[f"{prefix}conv{k}"] = "parallel"
                continue
            if parts[0] == "bns" and len(parts) == 3:
                out[f"{prefix}bn{k}.{parts[2]}"] = value
                continue
            if parts[0] == "bns" and parts[2] == "1" and len(parts) == 4:
                out[f"{prefix}bn{k}.{parts[3]}"] = value
                continue
            if parts[0] == "bns" and parts[2:5] == ["0", "conv", "0"] and len(parts) == 6:
                out[f"{prefix}adapter{k}.bn.{parts[5]}"] = value
                adapters[f"{prefix}conv{k}"] = "series"
                continue
            if parts[0] == "bns" and parts[2:6] == ["0", "conv", "1", "weight"]:
                out[f"{prefix}adapter{k}.conv.weight"] = value
                adapters[f"{prefix}conv{k}"] = "series"
                continue
            raise WeightsFileError(f"{source}: key {key!r} is not part of the decathlon ResNet-26 as its authors' "
                                   f"code names it")
        m = re.match(r"^end_bns\.(\d+)\.0\.(\w+)$", key) or re.match(r"^linears\.(\d+)\.(\w+)$", key)
        if m:
            if m.group(1) != t:
                others.append(key)
            else:
                out[("bn." if key.startswith("end_bns") else "fc.") + m.group(2)] = value
            continue
        raise WeightsFileError(f"{source}: key {key!r} is not part of the decathlon ResNet-26 as its authors' code "
                               f"names it")
    return out, adapters, others


def _own_adapters(own: StateDict) -> Dict[str, str]:
    """Adapter kind per adapted conv of a state dict in this toolkit's names."""
    found = {}
    for key in own:
        m = re.match(r"^((?:layer\d\.\d+\.)?)adapter(\d)\.conv\.weight$", key)
        if m:
            prefix, n = m.groups()
            found[f"{prefix}conv{n}"] = "series" if f"{prefix}adapter{n}.bn.weight" in own else "parallel"
    return found


def _adapter_options(sd: StateDict, adapters: Dict[str, str], blocks: int, source: str) -> Tuple[Optional[str], str]:
    """(kind, proj) of the adapters a ResNet-26 carries: one kind, at the stem and at the
    same convs of every block, as the authors' network places them."""
    kinds = sorted(set(adapters.values()))
    if not kinds:
        return None, "11"
    if len(kinds) > 1:
        raise WeightsFileError(f"{source} mixes series and parallel adapters; a ResNet-26 carries one kind")
    block_convs = [f"layer{s}.{b}.conv{k}" for s in (1, 2, 3) for b in range(blocks) for k in (1, 2)]
    proj = "".join("1" if all(f"layer{s}.{b}.conv{k}" in adapters for s in (1, 2, 3) for b in range(blocks))
                   else "0" for k in (1, 2))
    expected = {"conv1"} | {c for c in block_convs if proj[int(c[-1]) - 1] == "1"}
    if set(adapters) != expected:
        held = ", ".join(sorted(adapters)[:6]) + ("..." if len(adapters) > 6 else "")
        raise WeightsFileError(f"{source} holds {kinds[0]} adapters at {len(adapters)} convolutions ({held}), not "
                               f"at the stem and the same convolutions of every block as the residual adapters' "
                               f"network places them; pass the plain ResNet-26 backbone file instead")
    return kinds[0], proj


def resnet26_from_state_dict(sd: StateDict, source: str = "weights") -> Tuple[ResNet26, dict]:
    """The ResNet-26 a state dict describes (the authors' key names or this toolkit's),
    loaded, and what was found: ``blocks``, ``width``, ``adapters``, ``proj``,
    ``num_classes``, ``task`` (which task of a multi-task file), ``ignored`` keys."""
    sd = strip_prefix({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    if any(k.startswith(("pre_layers_conv.", "end_bns.", "linears.")) for k in sd):
        task = _choose_task(sd, source)
        own, adapters, ignored = _ra_to_own(sd, task, source)
    else:
        task, own, ignored = 0, {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, []
        adapters = _own_adapters(own)
    stem = own.get("conv1.weight")
    fc = own.get("fc.weight")
    if stem is None or stem.dim() != 4 or fc is None or fc.dim() != 2:
        raise WeightsFileError(f"{source} lacks the ResNet-26 stem conv or classifier (conv1.weight, fc.weight "
                               f"in this toolkit's names)")
    counts = {s: len({m.group(2) for k in own for m in [_OWN_BLOCK.match(k)] if m and m.group(1) == str(s)})
              for s in (1, 2, 3)}
    if len(set(counts.values())) != 1 or not counts[1]:
        raise WeightsFileError(f"{source}: blocks per stage {counts}; a ResNet-26 has the same number in each")
    blocks, width = counts[1], int(stem.shape[0])
    if blocks not in (1, 4):
        raise WeightsFileError(f"{source} holds a ResNet of {blocks} blocks per stage (depth {6 * blocks + 2}); "
                               f"the decathlon's ResNet-26 has 4")
    kind, proj = _adapter_options(own, adapters, blocks, source)
    model = ResNet26(int(fc.shape[0]), blocks=blocks, width=width, adapters=kind, proj=proj)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in own and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in own if k not in expected)
    shapes = sorted(k for k in own if k in expected and tuple(own[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        report = LoadReport(missing, unexpected, {k: (tuple(own[k].shape), tuple(expected[k].shape))
                                                  for k in shapes})
        raise WeightsFileError(f"{source} does not fit a ResNet-26 of width {width}: {report.describe()}")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in own.items()}, strict=False)
    return model, {"blocks": blocks, "width": width, "adapters": kind, "proj": proj,
                   "num_classes": int(fc.shape[0]), "task": task, "ignored": ignored}
