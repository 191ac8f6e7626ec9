"""classification.data: splits checked before the first step, unreadable images found by a cached scan."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from classification.data import ImageFolderDataset, check_splits, scan_images, subset_indices
from common.errors import DataError


def _tree(root, spec):
    """spec: {split: {class: number of images}}"""
    rng = np.random.default_rng(0)
    for split, classes in spec.items():
        for name, n in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _pair(root, **kw):
    train = ImageFolderDataset(root, "train", limit=kw.get("train_limit"), exclude=kw.get("exclude"))
    return train, ImageFolderDataset(root, "test", limit=kw.get("eval_limit"))


def test_good_splits_pass(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 4, "b": 3}, "test": {"a": 2, "b": 2}})
    check_splits(*_pair(root))
    check_splits(*_pair(root, train_limit=2, eval_limit=2))


def test_empty_class_folder_is_named(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 3, "b": 3, "c": 0}, "test": {"a": 1, "b": 1, "c": 1}})
    train, test = _pair(root)
    assert train.class_counts == [3, 3, 0]
    with pytest.raises(DataError) as err:
        check_splits(train, test)
    message = str(err.value)
    assert str(root / "train" / "c") in message and "no images" in message and "\n" not in message


def test_single_class(tmp_path):
    root = _tree(tmp_path, {"train": {"only": 3}, "test": {"only": 1}})
    with pytest.raises(DataError, match="single class.*'only'.*at least 2"):
        check_splits(*_pair(root))


def test_classes_only_in_one_split_are_named(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 2, "b": 2, "c": 2}, "test": {"a": 1, "b": 1, "d": 1}})
    train = ImageFolderDataset(root, "train")
    test = ImageFolderDataset(root, "test")
    with pytest.raises(DataError, match=r"same class folders \(only in train: 'c'; only in test: 'd'\)"):
        check_splits(train, test)
    with pytest.raises(DataError, match=r"same class folders.*only in test: 'd'"):
        ImageFolderDataset(root, "test", classes=train.classes)


def test_limit_that_drops_a_class_names_the_limit(tmp_path):
    root = _tree(tmp_path, {"train": {"a": 4, "b": 4, "c": 4}, "test": {"a": 2, "b": 2, "c": 2}})
    with pytest.raises(DataError) as err:
        check_splits(*_pair(root, train_limit=2))
    message = str(err.value)
    assert message.startswith("--train-limit 2 leaves 1 of the 3 classes") and "at least 3" in message
    with pytest.raises(DataError, match="--eval-limit 1 leaves 2 of the 3 classes.*at least 3"):
        check_splits(*_pair(root, eval_limit=1))
    # the limits may also be passed explicitly, e.g. before building the subsets
    with pytest.raises(DataError, match="--train-limit 1"):
        check_splits(*_pair(root), train_limit=1)
    # an imbalanced split needs more than one image per class
    root = _tree(tmp_path / "skew", {"train": {"a": 1, "b": 30}, "test": {"a": 1, "b": 1}})
    with pytest.raises(DataError, match=r"--train-limit 2 .*\('a'\).*at least (\d+)") as err:
        check_splits(*_pair(root, train_limit=2))
    suggested = int(str(err.value).split("at least ")[1].split()[0])
    targets = ImageFolderDataset(root, "train").targets
    assert set(np.asarray(targets)[subset_indices(targets, suggested)]) == {0, 1}
    assert set(np.asarray(targets)[subset_indices(targets, suggested - 1)]) == {1}


def test_scan_finds_unreadable_files_and_exclude_drops_them(tmp_path):
    root = _tree(tmp_path / "d", {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}})
    junk = root / "train" / "a" / "junk.png"
    junk.write_bytes(b"not an image")
    cut = root / "train" / "b" / "0.png"
    big = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(cut)
    cut.write_bytes(cut.read_bytes()[:300])
    train = ImageFolderDataset(root, "train")
    bad = scan_images(train.paths + [str(root / "gone.png")])
    assert [p for p, _ in bad] == [str(junk), str(cut), str(root / "gone.png")]
    assert all(reason and "\n" not in reason for _, reason in bad)
    assert "does not exist" in bad[2][1]
    clean = ImageFolderDataset(root, "train", exclude=[p for p, _ in bad])
    assert len(clean) == len(train) - 2 and clean.excluded == [str(junk), str(cut)]
    assert clean.class_counts == [3, 2]
    assert scan_images(clean.paths) == []
    # excluding every image of a class is caught before training
    only_a = [p for p, t in train.samples if t == 0]
    with pytest.raises(DataError, match="class folder .*a holds no images after excluding 4 unreadable files"):
        check_splits(ImageFolderDataset(root, "train", exclude=only_a), ImageFolderDataset(root, "test"))


def test_scan_cache_is_reused_and_follows_changes(tmp_path, monkeypatch):
    import classification.data as data

    root = _tree(tmp_path / "d", {"train": {"a": 3, "b": 2}})
    junk = root / "train" / "a" / "junk.png"
    junk.write_bytes(b"broken")
    paths = ImageFolderDataset(root, "train").paths
    cache = tmp_path / "run" / "image_scan.json"
    first = scan_images(paths, cache_path=cache)
    assert [p for p, _ in first] == [str(junk)]
    stored = json.loads(cache.read_text())
    assert len(stored["files"]) == len(paths)
    assert not [p for p in cache.parent.iterdir() if p.name != cache.name]  # no temporary files

    decoded = []
    real = data.decode_rgb
    monkeypatch.setattr(data, "decode_rgb", lambda p, **kw: decoded.append(p) or real(p, **kw))
    assert scan_images(paths, cache_path=cache) == first
    assert decoded == []  # nothing decoded again

    Image.new("RGB", (4, 4)).save(junk, format="PNG")  # repaired: new size and mtime
    st = os.stat(junk)
    os.utime(junk, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert scan_images(paths, cache_path=cache) == []
    assert decoded == [str(junk)]

    cache.write_text("{damaged")
    assert scan_images(paths, cache_path=cache) == []  # a damaged cache is rebuilt
    assert json.loads(cache.read_text())["format"] == 1
