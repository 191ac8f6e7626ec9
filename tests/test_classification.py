"""classification/: weight layouts and lookup, model registry, ImageFolder data and
augmentation, and the train/evaluate commands end to end on a generated ImageFolder tree."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from classification.data import (ClassificationTransform, ImageFolderDataset, random_resized_crop_box,
                                 resolve_split, subset_indices)
from classification.models import arch_source, pretrained_model
from classification.weights import LAYOUTS, fit_state_dict, load_pretrained, resolve_weights
from common.torchfile import read_state_dict
from common.config import read_run_config
from common.errors import DataError, MissingFileError, PiggybackError, UsageError, WeightsFileError

ROOT = Path(__file__).resolve().parents[1]

# torchvision key -> the older flat layout, the inverse of the documented renaming.
_TO_FLAT_T1 = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}
_TO_FLAT_T6 = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}


def to_flat_layout(sd):
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "features" and len(parts) > 3 and parts[2] == "conv":
            block = int(parts[1])
            table = _TO_FLAT_T1 if block == 1 else _TO_FLAT_T6
            for tv, flat in sorted(table.items(), key=lambda kv: -len(kv[0])):
                prefix = f"features.{block}.conv.{tv}."
                if key.startswith(prefix):
                    out[f"features.{block}.conv.{flat}.{key[len(prefix):]}"] = value
                    break
            else:
                raise AssertionError(key)
        elif not key.startswith("classifier."):
            out[key] = value
    return out


# ---------------------------------------------------------------- weights

def test_flat_mobilenet_v2_layout_is_renamed_exactly(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v2()
    flat = to_flat_layout(source.state_dict())
    assert len(flat) == 312
    path = tmp_path / "old.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in flat.items()}}, path)
    target = torchvision.models.mobilenet_v2()
    report = load_pretrained(target, path, "mobilenet_v2")
    assert report["layout"] == "mobilenet_v2_flat"
    assert report["loaded"] == 312
    assert report["not_in_file"] == ["classifier.1.bias", "classifier.1.weight"]
    for key, value in source.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(target.state_dict()[key], value), key


def test_torchvision_file_with_imagenet_head_loads_with_plain_layout(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model, report = pretrained_model("resnet18", 7, path)
    assert report["layout"] == "plain" and report["classifier"] == "fc"
    assert model.fc.out_features == 7
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_weights_that_do_not_fit_name_the_file_and_keys(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(WeightsFileError) as err:
        pretrained_model("mobilenet_v2", 10, path)
    message = str(err.value)
    assert str(path) in message and "does not fit mobilenet_v2" in message
    assert "file keys the model lacks (bn1.bias" in message
    assert "model keys missing from the file (features.0.0.weight" in message
    assert "mobilenet_v2_flat" in message and "plain" in message


def test_shape_mismatch_is_reported(tmp_path):
    sd = torchvision.models.mobilenet_v2().state_dict()
    sd["features.0.0.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(WeightsFileError, match="other shape.*features.0.0.weight"):
        fit_state_dict(torchvision.models.mobilenet_v2(), sd, "mobilenet_v2", "x.pth")


def test_unreadable_and_empty_files(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsFileError, match="bad.pth"):
        read_state_dict(bad)
    empty = tmp_path / "empty.pth"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(WeightsFileError, match="no tensors"):
        read_state_dict(empty)


def test_resolve_weights_path_cache_and_imagenet(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cache = tmp_path / "home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    with pytest.raises(MissingFileError, match="resnet18-f37072fd.pth"):
        resolve_weights("imagenet", "resnet18")
    (cache / "resnet18-f37072fd.pth").write_bytes(b"x")
    assert resolve_weights("imagenet", "resnet18") == cache / "resnet18-f37072fd.pth"
    assert resolve_weights("resnet18-f37072fd.pth") == cache / "resnet18-f37072fd.pth"
    local = tmp_path / "w.pth"
    local.write_bytes(b"x")
    assert resolve_weights(str(local)) == local
    with pytest.raises(MissingFileError, match="nothing.pth"):
        resolve_weights("nothing.pth")


def test_layout_registry_lists_the_mobilenet_layout():
    assert LAYOUTS["mobilenet_v2_flat"].archs == ("mobilenet_v2",)
    assert LAYOUTS["plain"].archs == ()


# ---------------------------------------------------------------- models

def test_arch_names_from_both_libraries():
    assert arch_source("resnet50") == ("torchvision", "resnet50")
    assert arch_source("timm:resnet50") == ("timm", "resnet50")
    assert arch_source("test_resnet") == ("timm", "test_resnet")
    with pytest.raises(UsageError, match="close names: .*mobilenet_v2"):
        arch_source("mobilenet_v22")


def test_timm_model_from_a_local_safetensors_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "t.safetensors"))
    model, report = pretrained_model("timm:test_efficientnet", 4, tmp_path / "t.safetensors")
    assert report["classifier"] == "classifier" and model.get_classifier().out_features == 4
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)


# ---------------------------------------------------------------- data

def write_tree(root: Path, classes=("cat", "dog", "eel"), per_split=None, size=(20, 14), seed=0):
    """An ImageFolder tree of small RGB PNGs whose class is their colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    per_split = per_split or {"train": 8, "test": 4}
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]], dtype=np.float64)
    for split, n in per_split.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = colours[c % 3] + rng.normal(0, 25, (size[1], size[0], 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_random_resized_crop_box_stays_inside_and_covers_the_range():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(60, 40, (0.08, 1.0), rng)
        assert 0 <= left and left + w <= 60 and 0 <= top and top + h <= 40 and w > 0 and h > 0
        areas.append(w * h / 2400)
    assert min(areas) < 0.15 and max(areas) > 0.8
    assert random_resized_crop_box(60, 40, (1.0, 1.0), rng) == (3, 0, 53, 40)  # ratio capped at 4/3


def test_transforms_shapes_determinism_and_eval_crop(tmp_path):
    from PIL import Image

    img = Image.fromarray(np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3))
    train = ClassificationTransform(train=True, size=16)
    a = train(img, rng=np.random.default_rng([1, 2, 3]))
    b = train(img, rng=np.random.default_rng([1, 2, 3]))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    ev = ClassificationTransform(train=False, size=16, eval_resize=20)
    assert ev.eval_resize == 20 and ev(img).shape == (3, 16, 16)
    gray = Image.fromarray(np.full((8, 8), 128, dtype=np.uint8), mode="L")
    x = ClassificationTransform(train=False, size=32, eval_resize=32)(gray)
    assert x.shape == (3, 32, 32) and torch.allclose(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456, atol=1e-5)
    with pytest.raises(UsageError):
        ClassificationTransform(train=False, size=32, eval_resize=16)


def test_image_folder_splits_subsets_and_errors(tmp_path):
    root = write_tree(tmp_path / "data", per_split={"train": 10, "val": 3})
    assert resolve_split(root, "auto") == "val"
    ds = ImageFolderDataset(root, "train", limit=9)
    assert ds.classes == ["cat", "dog", "eel"] and len(ds) == 9 and np.bincount(ds.targets).tolist() == [3, 3, 3]
    assert subset_indices([0] * 10 + [1] * 30, 8).tolist() == sorted(subset_indices([0] * 10 + [1] * 30, 8).tolist())
    assert np.bincount(np.array([0] * 10 + [1] * 30)[subset_indices([0] * 10 + [1] * 30, 8)]).tolist() == [2, 6]
    with pytest.raises(DataError, match="same class folders"):
        ImageFolderDataset(root, "val", classes=["cat", "dog"])
    (root / "val" / "eel" / "broken.png").write_bytes(b"no image")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolderDataset(root, "val")[len(ImageFolderDataset(root, "val")) - 1]
    with pytest.raises(MissingFileError, match="expected"):
        ImageFolderDataset(tmp_path / "none", "train")


# ---------------------------------------------------------------- commands

def _run(args, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A generated ImageFolder tree and a torchvision-keyed weight file of a timm net."""
    import timm
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("cls")
    write_tree(base / "data", per_split={"train": 8, "test": 4})
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()},
              str(base / "test_resnet.safetensors"), metadata={"arch": "test_resnet"})
    return base


COMMON = ["--size", "32", "--eval-resize", "36", "--batch-size", "8", "--workers", "0", "--device", "cpu",
          "--print-freq", "2"]


@pytest.mark.slow
def test_train_piggyback_writes_the_run_folder_resumes_and_evaluates(tiny):
    out = tiny / "run"
    args = ["classification.train", "--data-root", str(tiny / "data"), "--weights",
            str(tiny / "test_resnet.safetensors"), "--out", str(out), "--epochs", "2", "--lr-steps", "1"] + COMMON
    _run(args)
    for name in ("config.json", "log.jsonl", "checkpoint.pt", "masks.safetensors", "metrics.json",
                 "sparsity.png", "curves.png"):
        assert (out / name).is_file(), name
    config = read_run_config(out)
    assert config["arch"] == "test_resnet" and config["recipe"] == "default" and config["classifier"] == "fc"
    assert config["mask_init"] == "spread" and config["classes"] == ["cat", "dog", "eel"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["eval_count"] == 12 and 0 <= metrics["top1"] <= 100
    assert 0 <= metrics["sparsity"] <= 1 and metrics["sparsity_layers"]
    assert set(metrics["sparsity_layers"]) >= {"conv1.0", "layer1.0.conv1"}
    assert len((out / "log.jsonl").read_text().splitlines()) == 2

    # resume to a third epoch: the log grows by one line, the result is rescored
    proc = _run(args[:-len(COMMON)] + COMMON + ["--epochs", "3"])
    assert "resumed" in proc.stdout
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    # changed settings are refused with one line
    proc = _run(args + ["--lr", "1e-3"], check=False)
    assert proc.returncode == 2 and "other settings" in proc.stderr and "Traceback" not in proc.stderr

    metrics = json.loads((out / "metrics.json").read_text())
    for target, compiled in ((out, "off"), (out / "masks.safetensors", "on")):  # on: inductor on the CPU
        proc = _run(["classification.evaluate", str(target), "--data-root", str(tiny / "data"), "--device", "cpu",
                     "--compile", compiled])
        assert f"top-1 {metrics['top1']:.2f}%" in proc.stdout
    assert json.loads((out / "eval_test.json").read_text())["top1"] == pytest.approx(metrics["top1"])


@pytest.mark.slow
def test_train_baselines_and_flag_errors(tiny):
    out = tiny / "feature"
    _run(["classification.train", "--data-root", str(tiny / "data"), "--weights",
          str(tiny / "test_resnet.safetensors"), "--out", str(out), "--epochs", "1", "--method", "feature",
          "--train-bn"] + COMMON)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sparsity"] is None and (out / "weights.safetensors").is_file()
    assert not (out / "sparsity.png").exists()
    proc = _run(["classification.evaluate", str(out), "--device", "cpu"])
    assert f"top-1 {metrics['top1']:.2f}%" in proc.stdout

    base = ["classification.train", "--data-root", str(tiny / "data"), "--out", str(tiny / "x")] + COMMON
    for extra, message in (
            (["--weights", str(tiny / "test_resnet.safetensors"), "--method", "finetune", "--train-bn"], "already train"),
            (["--weights", str(tiny / "test_resnet.safetensors"), "--method", "feature", "--mask-spread", "1e-3"],
             "only apply to --method piggyback"),
            ([], "needs --weights"),
            (["--weights", str(tiny / "test_resnet.safetensors"), "--arch", "mobilenet_v2"], "holds weights of test_resnet, not mobilenet_v2"),
            (["--weights", str(tiny / "missing.pth"), "--arch", "resnet18"], "missing.pth not found"),
    ):
        proc = _run(base + extra, check=False)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, (extra, proc.stderr)
    assert not (tiny / "x").exists()


def test_recipe_table_api():
    from common.recipes import RECIPES, get_recipe

    paper = get_recipe("paper")
    assert paper.mask_options() == {"mask_init": "constant", "mask_scale": 1e-2, "mask_spread": 0.0,
                                    "threshold": 5e-3}
    assert (paper.mask_optimizer, paper.mask_lr) == ("adam", 1e-4)
    default = get_recipe("default")
    assert default.mask_init == "spread" and default.mask_spread > 0
    assert default.mask_scale - default.mask_spread > default.threshold  # every mask starts switched on
    with pytest.raises(PiggybackError, match="valid: "):
        get_recipe("nope")
    assert set(RECIPES) >= {"paper", "default"}
