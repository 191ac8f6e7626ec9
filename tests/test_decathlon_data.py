"""Decathlon task registry, synthetic tree format, loader, transforms and decoded cache."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import DataError, MissingFileError
from conftest import require_real_labels
from common.loaders import build_loader, set_loader_epoch
from decathlon.data import DecathlonDataset, load_image
from decathlon.synthetic import make_synthetic_decathlon
from decathlon.tasks import MASK_TASKS, TASK_NAMES, TASKS, get_task, task_of_id
from decathlon.transforms import build_transforms

TASKS_USED = ("dtd", "omniglot", "daimlerpedcls", "svhn")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("dec") / "decathlon-1.0"
    labels = root.parent / "labels"
    summary = make_synthetic_decathlon(root, tasks=TASKS_USED, num_classes={"dtd": 5},
                                       train_per_class=4, val_per_class=2, test_per_class=2,
                                       seed=1, labels_dir=labels)
    return root, labels, summary


# ------------------------------------------------------------------ registry

def test_registry_prefixes_and_names():
    assert TASK_NAMES == tuple(sorted(TASK_NAMES)) and len(TASKS) == 10
    assert MASK_TASKS == tuple(t for t in TASK_NAMES if t != "imagenet12")
    for i, name in enumerate(TASK_NAMES):
        assert TASKS[name].prefix == (i + 1) * 10_000_000
        assert task_of_id(TASKS[name].prefix + 200001).name == name
    assert (get_task("omniglot").num_classes, get_task("daimlerpedcls").num_classes) == (1623, 2)
    assert [t for t in TASK_NAMES if not TASKS[t].hflip] == ["gtsrb", "omniglot", "svhn"]
    with pytest.raises(ValueError, match="valid tasks: aircraft, cifar100"):
        get_task("mnist")
    spec = get_task("svhn")
    assert spec.class_index(spec.category_id(7)) == 7
    with pytest.raises(ValueError, match="80000011"):
        spec.class_index(80000011)


# ------------------------------------------------------------------ on-disk format

def _templates(text: str) -> set:
    """Line shapes with values blanked: what must agree between real and generated files."""
    text = re.sub(r'"(file_name|name|supercategory|date_created)":"[^"]*"', r'"\1":S', text)
    return {re.sub(r"\d+", "N", line) for line in text.split("\n")}


def test_generated_labels_match_real_file_layout(tree):
    root, labels, _ = tree
    real = require_real_labels("dtd_test.json").read_text()
    mine = (labels / "dtd_test.json").read_text()
    assert _templates(mine) == _templates(real)
    r, m = json.loads(real), json.loads(mine)
    assert list(m) == list(r)
    for key in ("images", "annotations", "categories"):
        assert list(m[key][0]) == list(r[key][0])
    assert [c["id"] for c in m["categories"]] == [c["id"] for c in r["categories"]]
    assert not mine.endswith("\n") and not real.endswith("\n")


def test_ids_layout_and_stripped_test(tree):
    root, labels, summary = tree
    info = summary["tasks"]["dtd"]
    p = 40_000_000
    train = json.loads((root / "annotations/dtd_train.json").read_text())
    val = json.loads((root / "annotations/dtd_val.json").read_text())
    test = json.loads((root / "annotations/dtd_test_stripped.json").read_text())
    assert [im["id"] for im in train["images"]] == list(range(p + 200001, p + 200001 + info["train"]))
    n = info["train"] + info["val"]
    assert [im["id"] for im in test["images"]] == [p + 200000 + n + k for k in range(1, info["test"] + 1)]
    assert "annotations" not in test
    assert all(a["id"] == a["image_id"] for a in val["annotations"])
    assert test["images"][0]["file_name"] == "data/dtd/test/000001.jpg"
    assert re.fullmatch(r"data/dtd/train/[^/]+/[^/]+\.jpg", train["images"][0]["file_name"])
    assert [c["id"] for c in train["categories"]] == list(range(p + 1, p + 48))


# ------------------------------------------------------------------ loader

def test_loader_ids_and_labels_follow_json(tree):
    root, _, _ = tree
    for split, parts in (("train", ["train"]), ("val", ["val"]), ("train+val", ["train", "val"])):
        ds = DecathlonDataset(root, "dtd", split)
        data = [json.loads((root / f"annotations/dtd_{p}.json").read_text()) for p in parts]
        ids = [im["id"] for d in data for im in d["images"]]
        by_id = {a["image_id"]: a["category_id"] for d in data for a in d["annotations"]}
        assert ds.image_ids == ids
        assert ds.targets == [by_id[i] - 40_000_001 for i in ids]
    assert set(DecathlonDataset(root, "dtd", "train").targets) == set(range(5))
    test = DecathlonDataset(root, "dtd", "test")
    assert test.targets == [-1] * len(test)
    assert test.image_ids == tree[2]["tasks"]["dtd"]["test_ids"]


def test_grayscale_and_portrait_images(tree):
    root, _, _ = tree
    ds = DecathlonDataset(root, "omniglot", "train")
    img, _ = ds[0]
    assert img.shape == (3, 72, 72) and img.dtype == torch.uint8
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])  # gray replicated
    raw = load_image(root / json.loads((root / "annotations/omniglot_train.json").read_text())["images"][0]["file_name"])
    assert raw.shape == (72, 72, 3)
    ped = DecathlonDataset(root, "daimlerpedcls", "val")
    assert ped[0][0].shape == (3, 144, 72)  # 72 wide, 144 high
    x, y = DecathlonDataset(root, "daimlerpedcls", "val", transform=build_transforms("daimlerpedcls", True))[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y in (0, 1)
    shapes = {tuple(DecathlonDataset(root, "dtd", "train")[i][0].shape[1:]) for i in range(12)}
    assert any(h != w for h, w in shapes) and all(min(s) == 72 for s in shapes)


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_name_the_culprit(tree, tmp_path):
    root = _copy_tree(tree[0], tmp_path / "d")
    (root / "annotations/svhn_train.json").rename(root / "annotations/moved.json")
    with pytest.raises(FileNotFoundError, match=r"svhn_train\.json"):
        DecathlonDataset(root, "svhn", "train")
    (root / "annotations/moved.json").rename(root / "annotations/svhn_train.json")

    ds = DecathlonDataset(root, "svhn", "val")
    first = root / json.loads((root / "annotations/svhn_val.json").read_text())["images"][0]["file_name"]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(first))):
        ds[0]
    first.write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match=re.escape(str(first)) + ".*could not be decoded"):
        ds[0]

    path = root / "annotations/svhn_train.json"
    data = json.loads(path.read_text())
    data["annotations"][3]["category_id"] = 80000011  # svhn has 10 classes
    path.write_text(json.dumps(data))
    bad_image = data["annotations"][3]["image_id"]
    with pytest.raises(ValueError, match=f"svhn_train.json.*image id {bad_image}.*80000011"):
        DecathlonDataset(root, "svhn", "train")
    data["annotations"][3]["category_id"] = 40000001  # another task's id
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="40000001"):
        DecathlonDataset(root, "svhn", "train")
    with pytest.raises(ValueError, match="unknown split"):
        DecathlonDataset(root, "svhn", "holdout")
    with pytest.raises(ValueError, match="valid tasks"):
        DecathlonDataset(root, "mnist", "train")


def test_stripped_test_with_empty_annotation_list(tree, tmp_path):
    root = _copy_tree(tree[0], tmp_path / "d")
    path = root / "annotations/svhn_test_stripped.json"
    data = json.loads(path.read_text())
    data["annotations"] = []
    path.write_text(json.dumps(data))
    ds = DecathlonDataset(root, "svhn", "test")
    assert len(ds) == len(data["images"]) and set(ds.targets) == {-1}


# ------------------------------------------------------------------ transforms and cache

def test_transforms_flip_policy_and_determinism():
    img = np.zeros((72, 90, 3), np.uint8)
    img[:, :30] = 255  # bright left side: a flip moves it right
    for task, flips in (("svhn", False), ("dtd", True)):
        tf = build_transforms(task, True, crop=72)  # crop == resize: only the flip varies
        outs = [tf(img, rng=np.random.default_rng(s)) for s in range(16)]
        left_bright = [bool(o[:, :, :10].mean() > o[:, :, -10:].mean()) for o in outs]
        assert all(left_bright) != flips and (not flips or any(left_bright))
    tf = build_transforms("dtd", True)
    a, b = tf(img, rng=np.random.default_rng(5)), tf(img, rng=np.random.default_rng(5))
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    ev = build_transforms("dtd", False)
    assert torch.equal(ev(img), ev(img))
    with pytest.raises(ValueError, match="crop"):
        build_transforms("dtd", True, resize=60, crop=64)


def test_loader_order_depends_on_epoch_only(tree):
    root, _, _ = tree

    def epoch_batches(epoch, workers):
        ds = DecathlonDataset(root, "dtd", "train", transform=build_transforms("dtd", True), seed=3)
        loader = build_loader(ds, batch_size=8, train=True, workers=workers, seed=3)
        set_loader_epoch(loader, epoch)
        return [x for x, _ in loader]

    a, b, c = epoch_batches(1, 0), epoch_batches(1, 2), epoch_batches(2, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_cache_gives_identical_samples_without_decoding(tree, tmp_path):
    root = _copy_tree(tree[0], tmp_path / "d")
    tf = build_transforms("dtd", True)
    plain = DecathlonDataset(root, "dtd", "train+val", transform=tf)
    cached = DecathlonDataset(root, "dtd", "train+val", transform=tf, cache_dir=tmp_path / "cache")
    for ds in (plain, cached):
        ds.set_epoch(4)
    expected = [plain[i][0] for i in range(len(plain))]
    assert all(torch.equal(cached[i][0], e) for i, e in enumerate(expected))
    assert sum(c.filled() for c in cached.caches) == len(plain)
    for jpg in (root / "data" / "dtd").rglob("*.jpg"):
        jpg.unlink()  # from now on only the cache can supply pixels
    again = DecathlonDataset(root, "dtd", "train+val", transform=tf, cache_dir=tmp_path / "cache")
    again.set_epoch(4)
    assert all(torch.equal(again[i][0], e) for i, e in enumerate(expected))
    with pytest.raises(FileNotFoundError):
        plain[0]


def test_cache_serves_a_wrongly_sized_image_uncached(tree, tmp_path):
    root = _copy_tree(tree[0], tmp_path / "d")
    path = root / "annotations/svhn_val.json"
    data = json.loads(path.read_text())
    data["images"][1]["width"] = 80  # the file itself is 72 px wide
    path.write_text(json.dumps(data))
    ds = DecathlonDataset(root, "svhn", "val", cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning, match="annotation says 80x72"):
        assert ds[1][0].shape == (3, 72, 72)
    assert ds[0][0].shape == (3, 72, 72) and ds.caches[0].filled() == 1


def test_loader_reads_the_real_published_files(tmp_path):
    (tmp_path / "annotations").mkdir()
    real = require_real_labels("vgg-flowers_test.json")
    for part in ("train", "test_stripped"):  # as a labelled split and as the stripped one
        (tmp_path / "annotations" / f"vgg-flowers_{part}.json").write_bytes(real.read_bytes())
    data = json.loads(real.read_text())
    with pytest.raises(MissingFileError, match="6149 of the 6149 images"):
        DecathlonDataset(tmp_path, "vgg-flowers", "train")  # annotations without their images
    labelled = DecathlonDataset(tmp_path, "vgg-flowers", "train", check_files=False)
    stripped = DecathlonDataset(tmp_path, "vgg-flowers", "test", check_files=False)
    ids = [im["id"] for im in data["images"]]
    assert labelled.image_ids == stripped.image_ids == ids and len(ids) == 6149
    by_id = {a["image_id"]: a["category_id"] for a in data["annotations"]}
    assert labelled.targets == [by_id[i] - 100_000_001 for i in ids]
    assert set(stripped.targets) == {-1} and max(labelled.targets) == 101


# ------------------------------------------------------------------ partial image files

def _first_file(root: Path, task: str, split: str) -> Path:
    images = json.loads((root / f"annotations/{task}_{split}.json").read_text())["images"]
    return root / images[0]["file_name"]


def test_truncated_jpeg_is_refused_naming_the_file(tree, tmp_path):
    import cv2

    root = _copy_tree(tree[0], tmp_path / "d")
    jpeg = _first_file(root, "svhn", "val")
    whole = jpeg.read_bytes()
    assert load_image(jpeg).shape == (72, 72, 3)
    jpeg.write_bytes(whole[: len(whole) // 3])
    assert cv2.imread(str(jpeg)) is not None  # OpenCV alone decodes the partial file quietly
    ds = DecathlonDataset(root, "svhn", "val", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as err:
        ds[0]
    message = str(err.value)
    assert "\n" not in message and str(jpeg) in message and "truncated" in message
    assert "0xFFD9" in message and "image id" in message
    assert ds.caches[0].filled() == 0  # nothing of the partial image went into the cache
    # bytes after the end-of-image marker (camera trailers) are accepted
    jpeg.write_bytes(whole + b"\x00" * 16 + b"trailer")
    assert ds[0][0].shape == (3, 72, 72)


def test_truncated_png_is_refused_naming_the_file(tmp_path):
    import cv2

    ok, buf = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    png = tmp_path / "x.png"
    png.write_bytes(buf.tobytes())
    assert load_image(png).shape == (40, 30, 3)
    png.write_bytes(buf.tobytes()[:-20])
    with pytest.raises(DataError, match=re.escape(str(png)) + " is truncated: a PNG .*IEND"):
        load_image(png)
    with pytest.raises(MissingFileError, match="gone.jpg"):
        load_image(tmp_path / "gone.jpg")
