"""Decathlon backbones: WRN-28-4 shape facts, checkpoint files, external key mapping,
and what each training method leaves trainable."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.masking import MaskedConv2d, MaskedLayer, masked_modules
from common.heads import reset_classifier
from common.methods import METHODS, MaskSettings, load_task, save_task
from decathlon.external import load_external_weights, remap_external_state_dict
from decathlon.models import load_backbone, open_backbone, save_backbone
from decathlon.networks import create_model, model_names


def _count(model, kind):
    return sum(p.numel() for m in model.modules() if isinstance(m, kind) for p in m.parameters(recurse=False))


def test_wrn28_4_matches_the_paper_backbone():
    model = create_model("wrn28_4", 1000)
    assert _count(model, nn.Conv2d) == 5_839_280
    assert _count(model, nn.BatchNorm2d) == 7_200
    assert _count(model, nn.Linear) == 257_000
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    sizes = {}
    for name in ("conv1", "layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(lambda m, i, o, n=name: sizes.__setitem__(n, tuple(o.shape[1:])))
    assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    assert sizes == {"conv1": (16, 64, 64), "layer1": (64, 32, 32), "layer2": (128, 16, 16),
                     "layer3": (256, 8, 8)}
    # stride 2 sits in the first block of each group, on its first conv and its shortcut
    for g in (1, 2, 3):
        first = getattr(model, f"layer{g}")[0]
        assert first.conv1.stride == (2, 2) and first.shortcut.stride == (2, 2)
        assert all(b.conv1.stride == (1, 1) and b.shortcut is None for b in getattr(model, f"layer{g}")[1:])


def test_registry_and_small_variant():
    assert {"wrn28_4", "wrn10_1"} <= set(model_names())
    model = create_model("wrn10_1", 5)
    assert model.fc.out_features == 5 and model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(ValueError, match="valid: .*wrn10_1.*wrn28_4"):
        create_model("resnet50", 10)


def test_backbone_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_model("wrn10_1", 7)
    model.train()(torch.randn(4, 3, 64, 64))  # non-trivial BN running statistics
    save_backbone(tmp_path / "bb.pt", model, "wrn10_1", val_top1=12.5, task="imagenet12")
    loaded, meta = load_backbone(tmp_path / "bb.pt")
    assert meta["arch"] == "wrn10_1" and meta["num_classes"] == 7 and meta["val_top1"] == 12.5
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    with pytest.raises(ValueError, match="--arch wrn28_4 differs"):
        open_backbone(tmp_path / "bb.pt", "wrn28_4")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not a backbone file written by this toolkit"):
        load_backbone(tmp_path / "other.pt")


def _module_style(sd):
    """Rename to the module-style WRN convention (block{g}.layer.{i}, convShortcut, bn1)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layer(\d)\.(\d+)\.shortcut\.", r"block\1.layer.\2.convShortcut.", k)
        k = re.sub(r"^layer(\d)\.(\d+)\.", r"block\1.layer.\2.", k)
        k = re.sub(r"^bn\.", "bn1.", k)
        out["module." + k] = v
    return out


def _functional_style(sd):
    """Rename to the functional WRN convention (conv0, group{g-1}.block{i}.conv{j-1}, convdim)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        m = re.match(r"^layer(\d)\.(\d+)\.(conv|bn)(\d)\.?(.*)$", k)
        if k == "conv1.weight":
            k = "conv0"
        elif k.startswith("layer") and ".shortcut." in k:
            g, b = re.match(r"^layer(\d)\.(\d+)", k).groups()
            k = f"group{int(g) - 1}.block{b}.convdim"
        elif m:
            g, b, kind, j, rest = m.groups()
            k = f"group{int(g) - 1}.block{b}.{kind}{int(j) - 1}"
            k += "" if kind == "conv" else f".{rest}"
        out[k] = v
    return out


@pytest.mark.parametrize("style", [_module_style, _functional_style])
def test_external_weights_import_by_key_mapping(style, tmp_path):
    torch.manual_seed(1)
    source = create_model("wrn10_1", 1000)
    source.train()(torch.randn(4, 3, 64, 64))
    external = style(source.state_dict())
    kept = set(external) & set(source.state_dict())  # only top-level names may coincide
    assert kept and all(k.startswith(("bn.", "fc.")) for k in kept) or not kept
    mapped = remap_external_state_dict(external)
    assert set(mapped) <= set(source.state_dict())
    target = create_model("wrn10_1", 1000)
    report = load_external_weights(target, external)
    assert report.unexpected == [] and report.mismatched == {}
    assert all(k.endswith("num_batches_tracked") for k in report.missing)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(source.eval()(x), target.eval()(x))
    torch.save(external, tmp_path / "ext.pt")
    model, meta = open_backbone(tmp_path / "ext.pt", "wrn10_1", log=lambda s: None)
    assert meta["source"] == "external" and torch.equal(model.eval()(x), source(x))


def test_external_import_reports_exact_unmatched_keys():
    source = create_model("wrn10_1", 10).state_dict()
    ext = _module_style(source)
    del ext["module.block2.layer.0.conv1.weight"]
    ext["module.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_external_weights(create_model("wrn10_1", 10), ext)
    msg = str(err.value)
    assert "['layer2.0.conv1.weight']" in msg and "['extra.weight']" in msg
    # a classifier of another size is expected (it is replaced per task): reported, accepted
    report = load_external_weights(create_model("wrn10_1", 47), _module_style(source))
    assert set(report.mismatched) == {"fc.weight", "fc.bias"} and report.unexpected == []
    assert report.mismatched["fc.weight"] == ((10, 64), (47, 64))


def test_weights_file_round_trip(tmp_path):
    model = create_model("wrn10_1", 3)
    path = save_task(tmp_path, model, "finetune", arch="wrn10_1", num_classes=3, task="svhn")
    assert path.name == "weights.safetensors"
    loaded = create_model("wrn10_1", 3)
    meta = load_task(tmp_path, loaded)
    assert meta["task"] == "svhn" and meta["method"] == "finetune"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_train_exactly_their_parameters(name):
    torch.manual_seed(0)
    model = create_model("wrn10_1", 1000)
    reset_classifier(model, 6)
    method = METHODS[name]
    prepared = method.prepare(model, head=("fc",), masks=MaskSettings(mask_init="constant") if method.uses_masks
                              else None)
    trainable = {id(p) for p in prepared.main + prepared.head + prepared.extras}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "mask_real" not in k and not k.startswith("fc.")}
    model.train()
    for m in prepared.frozen_modules:
        m.eval()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    F.cross_entropy(model(torch.randn(8, 3, 64, 64)), torch.arange(8) % 6).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prepared.main + prepared.head)
    opt.step()
    changed = {k for k, v in model.state_dict().items() if k in frozen_before and not torch.equal(v, frozen_before[k])}
    if name in ("piggyback", "feature"):
        assert changed == set()  # backbone weights and BN statistics bit-identical
    else:
        assert any(k.endswith("conv1.weight") for k in changed) and any("running_mean" in k for k in changed)
    if name == "piggyback":
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert len(list(masked_modules(model))) == len(convs) and all(isinstance(m, MaskedConv2d) for m in convs)
        assert not isinstance(model.fc, MaskedLayer) and model.fc.weight.requires_grad
