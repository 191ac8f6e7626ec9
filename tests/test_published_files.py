"""Files the field already published, read safely: the one reader of torch files (every
layout, Python 2 pickles, CUDA storages, whole pickled modules, hostile pickles, broken
downloads), the decathlon's ResNet-26 (plain, series and parallel adapters) and the piggyback
authors' released masks and training checkpoints. Fixtures are written here in the exact
legacy layout by stand-ins of the published classes (``tests/published``, ``legacy_files``);
every comparison is against what the stand-in network computes the published way."""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from common.errors import MaskFileError, UsageError, WeightsFileError
from common.maskfile import load_masks, read_mask_metadata
from common.masking import piggyback
from common.torchfile import BrokenFileError, LegacyObject, module_state_dict, read_torch_file
from classification.published import convert_published, init_from_checkpoint, read_published
from decathlon.models import load_backbone, open_backbone
from legacy_files import broken_download, malicious_pickle, published_modules, write_legacy

REPO = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}


def _cli(module, *args, ok=True, timeout=300):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode != 0:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-3000:])
    return proc


def _randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Weights and batch-norm statistics far from their defaults, so that a layer read
    into the wrong place changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return net


# ----------------------------------------------------------------------- the reader

STATE = {"conv.weight": torch.randn(4, 3, 3, 3), "ids": torch.arange(6), "t": torch.randn(3, 5).t(),
         "half": torch.randn(7).half(), "flags": torch.tensor([True, False])}

LAYOUTS = {
    "zip": lambda p, o: torch.save(o, p),
    "torch-legacy": lambda p, o: torch.save(o, p, _use_new_zipfile_serialization=False),
    "legacy-0.2": lambda p, o: write_legacy(p, o, v1=True, old_variables=True),
    "legacy-py2": lambda p, o: write_legacy(p, o, py2=True, v1=True, old_variables=True),
    "legacy-cuda": lambda p, o: write_legacy(p, o, cuda=True),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reader_reads_every_layout(tmp_path, layout):
    obj = {"state_dict": STATE, "param": nn.Parameter(torch.ones(3)), "name": "imnet", "epoch": 7, "acc": 61.5,
           "nested": [torch.zeros(2), (1, "a")]}
    LAYOUTS[layout](tmp_path / "f.pt", obj)
    out = read_torch_file(tmp_path / "f.pt")
    assert set(out["state_dict"]) == set(STATE)
    for k, v in STATE.items():
        assert out["state_dict"][k].dtype == v.dtype and torch.equal(out["state_dict"][k], v), k
        assert out["state_dict"][k].device.type == "cpu"
    assert torch.equal(out["param"], torch.ones(3)) and (out["name"], out["epoch"], out["acc"]) == ("imnet", 7, 61.5)
    assert torch.equal(out["nested"][0], torch.zeros(2)) and out["nested"][1] == (1, "a")


@pytest.mark.parametrize("layout", ["zip", "legacy-py2"])
def test_whole_pickled_modules_become_inert_records(tmp_path, layout):
    net = _randomise(torchvision.models.resnet18(num_classes=5))
    LAYOUTS[layout](tmp_path / "m.pt", {"model": net, "args": argparse.Namespace(dataset="cubs", lr=0.1)})
    out = read_torch_file(tmp_path / "m.pt")
    record = out["model"]
    assert isinstance(record, LegacyObject) and record.type_name == "torchvision.models.resnet.ResNet"
    assert not isinstance(record, nn.Module) and record.is_module
    sd, ref = module_state_dict(record), net.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert [n for n, _ in record.named_modules()] == [n for n, _ in net.named_modules()]
    assert out["args"].attrs == {"dataset": "cubs", "lr": 0.1}


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess", "unknown-class"])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_hostile_pickles_are_refused_without_running(tmp_path, kind, layout):
    path = malicious_pickle(tmp_path / "evil.pth", kind, layout)
    marker = path.with_suffix(".ran")
    readers = [
        lambda: read_torch_file(path),
        lambda: open_backbone(path, log=lambda s: None),
        lambda: read_published(path),
        lambda: __import__("common.torchfile", fromlist=["x"]).read_state_dict(path),
        lambda: __import__("segmentation.weights", fromlist=["x"]).load_backbone_state(
            __import__("segmentation.weights", fromlist=["x"]).BackboneSource("torchvision", path, "torchvision"),
            "vgg16"),
    ]
    names = {"os.system": "posix.system", "builtins.eval": "builtins.eval", "subprocess": "subprocess.call",
             "unknown-class": "logging.Logger"}
    for read in readers:
        with pytest.raises(WeightsFileError) as err:
            read()
        assert names[kind] in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.slow
def test_hostile_file_through_every_command(tmp_path):
    from classification.synthetic import write_synthetic_image_folder
    data = write_synthetic_image_folder(tmp_path / "data", classes=2, train_per_class=2, test_per_class=1, side=32)
    path = malicious_pickle(tmp_path / "evil.pth", "os.system", "legacy")
    commands = [("decathlon.train", "--task", "dtd", "--backbone", path, "--out", tmp_path / "o1"),
                ("decathlon.import_backbone", path, "--out", tmp_path / "b.safetensors"),
                ("classification.import_masks", path, "--arch", "resnet50", "--weights", path, "--out", tmp_path / "m"),
                ("classification.train", "--arch", "resnet18", "--weights", path, "--data-root", data,
                 "--out", tmp_path / "o2")]
    for module, *args in commands:
        proc = _cli(module, *args, ok=False)
        assert proc.returncode == 2 and "posix.system" in proc.stderr, (module, proc.stderr[-1500:])
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not path.with_suffix(".ran").exists()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("kind, words", [
    ("html", ["web page", "download the file itself"]), ("lfs", ["Git LFS pointer", "git lfs pull", "24567891"]),
    ("truncated", ["truncated", "fetch it again"]), ("truncated-legacy", ["truncated", "fetch it again"]),
    ("zip-other", ["zip archive of other files", "README.txt", "unpack it and pass imnet.t7"]),
    ("empty", ["empty (0 bytes)"])])
def test_broken_downloads_are_named(tmp_path, kind, words):
    path = broken_download(tmp_path / "imnet.t7", kind)
    for read in (lambda: read_torch_file(path, "backbone file"), lambda: open_backbone(path, log=lambda s: None)):
        with pytest.raises(BrokenFileError) as err:
            read()
        message = str(err.value)
        assert str(path) in message and "\n" not in message, message
        for word in words:
            assert word in message, (word, message)
    proc = _cli("decathlon.import_backbone", path, "--out", tmp_path / "bb.safetensors", ok=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and words[0] in proc.stderr
    assert not (tmp_path / "bb.safetensors").exists()


# ------------------------------------------------------------------ the decathlon ResNet-26

@contextlib.contextmanager
def _resnet26(mode="normal", proj="11", factor=0.25, blocks=(1, 1, 1), heads=(1000,), seed=0):
    """A stand-in residual-adapters network as its published definition builds it, an
    input and its output (task 0), with the stand-in modules importable meanwhile."""
    with published_modules() as m:
        m["config_task"].mode, m["config_task"].proj, m["config_task"].factor = mode, proj, factor
        torch.manual_seed(seed)
        net = _randomise(m["models"].ResNet(m["models"].BasicBlock, list(blocks), heads), seed)
        net.eval()
        x = torch.randn(2, 3, 72, 72)
        with torch.no_grad():
            y = net(x)
        yield net, x, y, m


@pytest.mark.parametrize("mode", ["normal", "series_adapters", "parallel_adapters"])
@pytest.mark.parametrize("form", ["t7-py2", "t7-zip", "state_dict", "net-state-dict"])
def test_resnet26_files_give_the_original_outputs(tmp_path, mode, form):
    with _resnet26(mode, blocks=(4, 4, 4) if form == "t7-py2" else (1, 1, 1)) as (net, x, y, _):
        path = tmp_path / "imnet.t7"
        if form == "t7-py2":
            write_legacy(path, {"net": net, "acc": 60.3, "epoch": 31}, py2=True, v1=True, old_variables=True)
        elif form == "t7-zip":
            torch.save({"net": net, "acc": 60.3, "epoch": 31}, path)
        elif form == "state_dict":
            torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
        else:
            torch.save({"net": net.state_dict(), "optimizer": {}, "acc": 60.3, "epoch": 31}, path)
    model, meta = open_backbone(path, log=lambda s: None)
    with torch.no_grad():
        out = model.eval()(x)
    assert torch.allclose(out, y, rtol=0, atol=1e-5), (out - y).abs().max()
    assert meta["arch"] == ("resnet26" if form == "t7-py2" else "resnet8") and meta["preprocess"] == "resnet26"
    assert meta["arch_options"]["adapters"] == {"normal": None}.get(mode, mode.split("_")[0])
    if form.startswith("t7"):
        assert meta["val_top1"] == 60.3 and meta["epoch"] == 31


def test_resnet26_multi_task_file_takes_the_imagenet_task(tmp_path):
    with _resnet26("parallel_adapters", heads=(10, 1000, 47)) as (net, x, _, m):
        m["config_task"].task = 1
        with torch.no_grad():
            y = net(x)
        m["config_task"].task = 0
        write_legacy(tmp_path / "multi.t7", {"net": net})
    model, meta = open_backbone(tmp_path / "multi.t7", log=lambda s: None)
    assert meta["num_classes"] == 1000 and torch.allclose(model.eval()(x), y, atol=1e-5)
    with _resnet26(heads=(10, 47)) as (net, _, _, _):
        torch.save({"net": net}, tmp_path / "two.t7")
    with pytest.raises(WeightsFileError, match="2 tasks .*no single 1000-class ImageNet task"):
        open_backbone(tmp_path / "two.t7", log=lambda s: None)


def test_resnet26_adapters_where_the_network_has_none_are_refused(tmp_path):
    with _resnet26("series_adapters") as (net, _, _, _):
        sd = net.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("layer2.0.conv1.bns.0.0.")}
    sd = {k.replace("layer2.0.conv1.bns.0.1.", "layer2.0.conv1.bns.0."): v for k, v in sd.items()}
    torch.save({"state_dict": sd}, tmp_path / "odd.pth")
    with pytest.raises(WeightsFileError, match="series adapters at .* pass the plain ResNet-26"):
        open_backbone(tmp_path / "odd.pth", log=lambda s: None)


@pytest.mark.slow
def test_import_backbone_command_and_training_on_it(tmp_path):
    from decathlon.synthetic import make_synthetic_decathlon
    with _resnet26() as (net, x, y, _):
        write_legacy(tmp_path / "imnet.t7", {"net": net, "acc": 58.0, "epoch": 12}, py2=True, v1=True)
    out = tmp_path / "resnet26.safetensors"
    proc = _cli("decathlon.import_backbone", tmp_path / "imnet.t7", "--out", out)
    assert "resnet8" in proc.stdout and out.is_file()
    model, meta = load_backbone(out)
    import hashlib
    assert meta["source_sha256"] == hashlib.sha256((tmp_path / "imnet.t7").read_bytes()).hexdigest()
    assert meta["preprocess"] == "resnet26" and meta["val_top1"] == 58.0
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), y, atol=1e-5)
    root = tmp_path / "decathlon-1.0"
    make_synthetic_decathlon(root, tasks=("svhn", "imagenet12"), num_classes={"svhn": 3, "imagenet12": 4},
                             train_per_class=3, val_per_class=1, test_per_class=1)
    runs = tmp_path / "runs"
    _cli("decathlon.train", "--task", "svhn", "--backbone", tmp_path / "imnet.t7", "--data-root", root, "--out", runs,
         "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu")
    config = json.loads((runs / "svhn" / "config.json").read_text())
    assert config["resolved"]["preprocess"] == "resnet26" and config["resolved"]["arch"] == "resnet8"
    sub = tmp_path / "sub"
    _cli("decathlon.submit", "--runs", runs, "--backbone", out, "--data-root", root, "--out", sub,
         "--allow-missing", "--workers", "0", "--device", "cpu")
    summary = json.loads((sub / "summary.json").read_text())
    assert summary["tasks"]["imagenet12"]["status"] == "submitted" and summary["tasks"]["svhn"]["status"] == "submitted"


# ------------------------------------------------------------------ the released masks

def _weights(arch: str, path: Path) -> dict:
    torch.manual_seed(0)
    sd = _randomise(torchvision.models.get_model(arch), 3).state_dict()
    torch.save(sd, path)
    return sd


WRAPPERS = {"resnet50": "ModifiedResNet", "densenet121": "ModifiedDenseNet", "vgg16": "ModifiedVGG16",
            "vgg16_bn": "ModifiedVGG16BN"}


def _packed(arch: str, sd: dict, path: Path, datasets=(("cubs_cropped", 200), ("flowers", 102)), ternary=False):
    """A packed masks file as the authors' pack.py writes it, and what their evaluation
    (plain network, masked-out weights zeroed, ternary -1 negated, classifier installed)
    gives on an input."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    refs, masks, heads = {}, {}, {}
    with published_modules() as m:
        wrapper = getattr(m["networks"], WRAPPERS[arch])
        shared = wrapper(sd).shared
        for name, classes in datasets:
            masks[name] = {}
            for idx, mod in enumerate(shared.modules()):
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    r = torch.rand(mod.weight.shape, generator=g)
                    mask = (r > 0.3).to(torch.uint8)
                    if ternary:
                        mask[r < 0.1] = 255
                    masks[name][idx] = mask
            heads[name] = nn.Linear(wrapper.FEATURES, classes)
            ref = wrapper(sd)
            with torch.no_grad():
                for idx, mod in enumerate(ref.shared.modules()):
                    if idx in masks[name]:
                        mod.weight[masks[name][idx] == 0] = 0
                        mod.weight[masks[name][idx] == 255] *= -1
            ref.add_dataset(name, classes)
            ref.set_dataset(name)
            ref.classifier = heads[name]
            with torch.no_grad():
                refs[name] = ref.eval()(x)
        write_legacy(path, {"dataset2masks": masks, "dataset2classifiers": heads}, py2=True, v1=True,
                     old_variables=True)
    return x, refs, masks


@pytest.fixture(scope="module")
def resnet50_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("released")
    sd = _weights("resnet50", base / "resnet50-19c8e357.pth")
    x, refs, masks = _packed("resnet50", sd, base / "resnet50_binary.pth")
    return {"base": base, "sd": sd, "weights": base / "resnet50-19c8e357.pth", "packed": base / "resnet50_binary.pth",
            "x": x, "refs": refs, "masks": masks}


def _outputs(arch: str, sd: dict, mask_file: Path, x: torch.Tensor) -> torch.Tensor:
    model = torchvision.models.get_model(arch)
    model.load_state_dict(sd)
    load_masks(model, mask_file)  # the plain network, converted by the file itself
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.slow
def test_packed_masks_give_the_authors_outputs(resnet50_files, tmp_path):
    f = resnet50_files
    proc = _cli("classification.import_masks", f["packed"], "--arch", "resnet50", "--weights", f["weights"],
                "--out", tmp_path / "masks")
    assert "wrote 2 mask file(s)" in proc.stdout
    total = sum(w.numel() for k, w in f["sd"].items() if k.endswith("weight") and w.dim() == 4)
    for name in ("cubs_cropped", "flowers"):
        path = tmp_path / "masks" / f"{name}.safetensors"
        out = _outputs("resnet50", f["sd"], path, f["x"])
        assert torch.allclose(out, f["refs"][name], rtol=1e-5, atol=1e-5), (out - f["refs"][name]).abs().max()
        meta = read_mask_metadata(path)
        assert meta["scheme"] == "binary" and meta["task"] == name and meta["arch"] == "resnet50"
        assert meta["eval_mode"] == ("squash" if name == "cubs_cropped" else "crop")
        head = meta["num_classes"] * (2048 + 1) * 4
        assert (meta["file_bytes"] - head) * 8 / total < 1.05  # one bit per masked weight, classifier aside


def test_packed_ternary_and_densenet(tmp_path):
    sd = _weights("densenet121", tmp_path / "w.pth")
    x, refs, _ = _packed("densenet121", sd, tmp_path / "dn.pth", datasets=(("sketches", 250),), ternary=True)
    files = convert_published(tmp_path / "dn.pth", "densenet121", tmp_path / "w.pth", tmp_path / "out",
                              log=lambda s: None)
    assert read_mask_metadata(files[0])["scheme"] == "ternary"
    assert torch.allclose(_outputs("densenet121", sd, files[0], x), refs["sketches"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vgg16", "vgg16_bn"])
def test_packed_vgg_masks_include_fc6_fc7(tmp_path, arch, all_cores):
    sd = _weights(arch, tmp_path / "w.pth")
    x, refs, masks = _packed(arch, sd, tmp_path / "vgg.pth", datasets=(("wikiart", 195),))
    files = convert_published(tmp_path / "vgg.pth", "vgg16bn" if arch == "vgg16_bn" else arch, tmp_path / "w.pth",
                              tmp_path / "out", log=lambda s: None)
    layers = read_mask_metadata(files[0])["layers"]
    assert {"classifier.0", "classifier.3"} <= set(layers) and len(layers) == len(masks["wikiart"]) == 15
    assert torch.allclose(_outputs(arch, sd, files[0], x), refs["wikiart"], rtol=1e-4, atol=1e-4)


def test_masks_of_another_network_are_refused_with_the_layer(resnet50_files, tmp_path):
    f = resnet50_files
    dn = tmp_path / "densenet121.pth"
    _weights("densenet121", dn)
    with pytest.raises(MaskFileError, match=r"mask \d+ .*does not fit densenet121|has shape .*densenet121"):
        convert_published(f["packed"], "densenet121", dn, tmp_path / "out", log=lambda s: None)
    small = tmp_path / "r50-other.pth"
    torch.save({k: (v[: v.shape[0] // 2] if k == "layer1.0.conv1.weight" else v) for k, v in f["sd"].items()}, small)
    with pytest.raises(WeightsFileError, match="layer1.0.conv1"):
        convert_published(f["packed"], "resnet50", small, tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_evaluate_scores_an_imported_mask_with_the_authors_preprocessing(resnet50_files, tmp_path):
    from classification.synthetic import write_synthetic_image_folder
    f = resnet50_files
    files = convert_published(f["packed"], "resnet50", f["weights"], tmp_path / "m", log=lambda s: None)
    data = write_synthetic_image_folder(tmp_path / "flowers", classes=102, train_per_class=1, test_per_class=1,
                                        side=240)
    proc = _cli("classification.evaluate", tmp_path / "m" / "flowers.safetensors", "--data-root", data,
                "--device", "cpu", "--batch-size", "17", "--limit", "34")
    assert "test top-1" in proc.stdout and "error" in proc.stdout
    small = write_synthetic_image_folder(tmp_path / "few", classes=3, train_per_class=1, test_per_class=1, side=40)
    proc = _cli("classification.evaluate", files[0], "--data-root", small, "--device", "cpu", ok=False)
    assert proc.returncode == 2 and "3 class folders" in proc.stderr and "200 classes" in proc.stderr


# ------------------------------------------------------------------ training checkpoints

def _checkpoint(arch, sd, path, fn="binarizer", train_bn=False, seed=2):
    g = torch.Generator().manual_seed(seed)
    with published_modules() as m:
        wrapper = getattr(m["networks"], WRAPPERS[arch])(sd, masked=True, threshold_fn=fn)
        wrapper.add_dataset("stanford_cars_cropped", 196)
        wrapper.set_dataset("stanford_cars_cropped")
        with torch.no_grad():
            for mod in wrapper.shared.modules():
                if hasattr(mod, "mask_real"):
                    mod.mask_real.copy_(torch.randn(mod.mask_real.shape, generator=g) * 0.01 + 0.006)
                    mod.mask_real.view(-1)[:3] = 5e-3  # exactly at the threshold: off for the authors
                elif train_bn and isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.add_(0.05)
        args = argparse.Namespace(arch={"vgg16_bn": "vgg16bn"}.get(arch, arch), dataset="stanford_cars_cropped",
                                  threshold_fn=fn, train_bn=train_bn, train_path="../data/stanford_cars_cropped/train")
        write_legacy(path, {"args": args, "epoch": 9, "accuracy": 88.1, "errors": [11.9], "model": wrapper},
                     py2=True, v1=True, old_variables=True)
        x = torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            y = wrapper.eval()(x)
    return x, y


@pytest.mark.slow
@pytest.mark.parametrize("fn", ["binarizer", "ternarizer"])
def test_checkpoint_converts_to_the_masks_it_trained(resnet50_files, tmp_path, fn):
    f = resnet50_files
    x, y = _checkpoint("resnet50", f["sd"], tmp_path / "ckpt.pth", fn)
    files = convert_published(tmp_path / "ckpt.pth", None, f["weights"], tmp_path / "out", log=lambda s: None)
    assert [p.name for p in files] == ["stanford_cars_cropped.safetensors"]
    assert read_mask_metadata(files[0])["scheme"] == {"binarizer": "binary", "ternarizer": "ternary"}[fn]
    assert torch.allclose(_outputs("resnet50", f["sd"], files[0], x), y, rtol=1e-4, atol=1e-5)


def test_checkpoint_on_other_weights_is_refused(resnet50_files, tmp_path):
    f = resnet50_files
    _checkpoint("resnet50", f["sd"], tmp_path / "ckpt.pth")
    other = tmp_path / "other.pth"
    torch.save({k: v + 1e-3 if k == "layer3.1.conv2.weight" else v for k, v in f["sd"].items()}, other)
    with pytest.raises(WeightsFileError, match="layer3.1.conv2.weight differs"):
        convert_published(tmp_path / "ckpt.pth", "resnet50", other, tmp_path / "out", log=lambda s: None)


@pytest.mark.slow
def test_init_masks_continues_from_a_checkpoint(resnet50_files, tmp_path):
    f = resnet50_files
    x, y = _checkpoint("resnet50", f["sd"], tmp_path / "ckpt.pth")
    model = torchvision.models.resnet50()
    model.load_state_dict(f["sd"])
    model.fc = nn.Linear(2048, 196)
    piggyback(model, skip=("fc",))
    init_from_checkpoint(model, tmp_path / "ckpt.pth", "resnet50", weights=str(f["weights"]), train_bn=False,
                         scheme="binary", threshold=5e-3)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), y, rtol=1e-4, atol=1e-5)
    with pytest.raises(UsageError, match="--threshold 0.005"):
        init_from_checkpoint(model, tmp_path / "ckpt.pth", "resnet50", weights=str(f["weights"]), train_bn=False,
                             scheme="binary", threshold=1e-2)
    with pytest.raises(UsageError, match="packed masks file"):
        init_from_checkpoint(model, f["packed"], "resnet50", weights=str(f["weights"]), train_bn=False,
                             scheme="binary", threshold=5e-3)
    from classification.synthetic import write_synthetic_image_folder
    data = write_synthetic_image_folder(tmp_path / "cars", classes=196, train_per_class=1, test_per_class=1, side=36)
    proc = _cli("classification.train", "--arch", "resnet50", "--weights", f["weights"], "--data-root", data,
                "--init-masks", tmp_path / "ckpt.pth", "--size", "32", "--eval-resize", "32", "--epochs", "1",
                "--batch-size", "98", "--train-limit", "196", "--eval-limit", "196", "--workers", "0",
                "--device", "cpu", "--out", tmp_path / "run", timeout=600)
    assert "start from" in proc.stdout and (tmp_path / "run" / "masks.safetensors").is_file()
