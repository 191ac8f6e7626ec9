"""SBD/VOC readers on files in the real formats, splits, input conventions, backbone weights."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import torch
from PIL import Image

from common.errors import UsageError
from segmentation.data import (CONVENTIONS, IGNORE_INDEX, DataError, build_split, class_names, find_sbd_root,
                               pad_collate, read_id_list, read_image, read_sbd_label, read_voc_label,
                               seg11valid_path)
from segmentation.model import build_vgg
from segmentation.palette import colorize, save_label_png, save_overview, voc_palette
from segmentation.synthetic import write_sbd_label, write_synthetic_pascal
from segmentation.weights import (BackboneSource, BackboneWeightsError, caffe_to_torchvision_keys,
                                  load_backbone_state, resolve_backbone)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_synthetic_pascal(tmp_path_factory.mktemp("pascal"), n_sbd_train=6, n_sbd_val=2, n_voc_train=3,
                                  n_voc_val=4, n_overlap=1, size=(20, 31), seed=1)


def _label(seed=0, h=13, w=17):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 21, size=(h, w)).astype(np.uint8)


# ----------------------------------------------------------------------------- SBD .mat

def test_sbd_reader_on_a_matlab_struct_written_independently(tmp_path):
    """A GTcls struct laid out like the SBD release (field order, cell of sparse boundaries)."""
    label = _label()
    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = scipy.sparse.csc_matrix(label == k + 1)
    gt = np.zeros((1, 1), dtype=[("Boundaries", object), ("Segmentation", object), ("CategoriesPresent", object)])
    gt[0, 0] = (boundaries, label, np.unique(label[label > 0]).reshape(-1, 1))
    path = tmp_path / "2008_000002.mat"
    scipy.io.savemat(path, {"GTcls": gt})
    np.testing.assert_array_equal(read_sbd_label(path), label)


def test_sbd_writer_round_trips_and_has_the_real_fields(tmp_path):
    label = _label(1)
    path = write_sbd_label(label, tmp_path / "cls" / "x.mat")
    mat = scipy.io.loadmat(path)
    assert set(mat["GTcls"].dtype.names) == {"Segmentation", "Boundaries", "CategoriesPresent"}
    assert mat["GTcls"][0]["Boundaries"][0].shape == (20, 1)
    np.testing.assert_array_equal(read_sbd_label(path), label)


def test_sbd_reader_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.mat"):
        read_sbd_label(tmp_path / "missing.mat")
    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"GTinst": {"Segmentation": _label()}})
    with pytest.raises(DataError, match=r"other\.mat.*'GTcls'.*GTinst"):
        read_sbd_label(other)
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"not a mat file at all")
    with pytest.raises(DataError, match="junk.mat"):
        read_sbd_label(junk)
    high = _label(2)
    high[0, 0] = 40
    with pytest.raises(DataError, match=r"high\.mat.*\[40\]"):
        read_sbd_label(write_sbd_label(high, tmp_path / "high.mat"))
    nofield = tmp_path / "nofield.mat"
    scipy.io.savemat(nofield, {"GTcls": {"Boundaries": np.zeros((2, 2))}})
    with pytest.raises(DataError, match="Segmentation"):
        read_sbd_label(nofield)


# ----------------------------------------------------------------------------- VOC palette PNG

def test_voc_palette_values():
    p = voc_palette()
    assert p[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert p[255].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in p}) == 256


def test_voc_reader_reads_indices_not_colours(tmp_path):
    label = _label(3)
    label[0, :] = IGNORE_INDEX
    path = save_label_png(label, tmp_path / "2007_000032.png")
    with Image.open(path) as img:
        assert img.mode == "P"
        assert img.getpalette()[3:6] == [128, 0, 0]
        rgb = np.array(img.convert("RGB"))
    np.testing.assert_array_equal(rgb, colorize(label))
    np.testing.assert_array_equal(read_voc_label(path), label)


def test_voc_reader_errors_name_the_file(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(rgb)
    with pytest.raises(DataError, match=r"rgb\.png.*'RGB'.*palette"):
        read_voc_label(rgb)
    bad = _label()
    bad[1, 1] = 30
    with pytest.raises(DataError, match=r"bad\.png.*\[30\]"):
        read_voc_label(save_label_png(bad, tmp_path / "bad.png"))
    with pytest.raises(DataError, match="nothing.png"):
        read_voc_label(tmp_path / "nothing.png")


def test_truncated_image_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "2007_000033.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path)
    assert read_image(path).shape == (60, 80, 3)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(DataError, match=r"2007_000033\.jpg: not a readable image \(image file is truncated"):
        read_image(path)


def test_synthetic_voc_labels_have_void_borders(tree):
    label = read_voc_label(tree.voc / "SegmentationClass" / f"{tree.ids['voc_val'][0]}.png")
    assert (label == IGNORE_INDEX).any() and (label == 0).any()


@pytest.mark.parametrize("size", [(6, 7), (300, 420)])
def test_overview_picture_full_resolution_captioned_readable(tmp_path, size):
    h, w = size
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    target = _label(5, h, w)
    target[0, :] = IGNORE_INDEX
    path = save_overview(image, _label(4, h, w), tmp_path / "o.png", target=target, gap=2,
                         image_id="2007_000032", iou=0.5)
    assert (path.stat().st_mode & 0o777) == 0o644
    with Image.open(path) as img:
        picture = np.array(img.convert("RGB"))
    # three panels, each at least the image's own size (small images enlarged by an integer factor)
    scale = max(1, -(-240 // max(h, w)))
    assert picture.shape[1] >= 3 * w * scale and picture.shape[0] > h * scale
    # the input panel holds the image's pixels unresampled (each one scale x scale times)
    big = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    corners = zip(*np.where((picture[:100, :60] == big[0, 0]).all(axis=-1)))
    assert any(np.array_equal(picture[y:y + big.shape[0], x:x + big.shape[1]], big) for y, x in corners)


# ----------------------------------------------------------------------------- lists and splits

def test_shipped_lists():
    ids = read_id_list(seg11valid_path())
    assert len(ids) == len(set(ids)) == 736 and ids[0] == "2007_000033"
    names = class_names()
    assert len(names) == 21 and names[0] == "background" and names[-1] == "tvmonitor"


def test_splits_on_a_synthetic_tree(tree):
    train = build_split("sbd", "train", tree.root)
    assert train.ids == tree.ids["sbd_train"]
    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3 and label.shape == image.shape[1:]
    assert label.dtype == torch.int64
    val = build_split("sbd", "val", tree.root, val_list=tree.seg11valid)
    assert val.ids == tree.ids["seg11valid"] and set(val.ids).isdisjoint(tree.ids["sbd_train"])
    assert str(val.labels[0]).endswith(".png")
    assert build_split("voc", "train", tree.root).ids == tree.ids["voc_train"]
    assert build_split("voc", "val", tree.root).ids == tree.ids["voc_val"]
    with pytest.raises(UsageError, match="'coco'; valid names: sbd, voc"):
        build_split("coco", "train", tree.root)


def test_shipped_seg11valid_keeps_present_ids_and_warns(tree, tmp_path):
    with pytest.raises(DataError, match="none of the 736"):
        build_split("sbd", "val", tree.root)
    partial = tmp_path / "partial.txt"
    partial.write_text(f"{tree.ids['seg11valid'][0]}\n2007_999999\n")
    with pytest.warns(UserWarning, match="1 of 2 images"):
        val = build_split("sbd", "val", tree.root, val_list=partial)
    assert val.ids == [tree.ids["seg11valid"][0]] and val.listed == 2


def test_missing_and_mismatched_files_are_named(tree, tmp_path):
    with pytest.raises(DataError, match="SBD dataset"):
        find_sbd_root(tmp_path)
    broken = write_synthetic_pascal(tmp_path / "b", n_sbd_train=3, n_sbd_val=1, n_voc_train=1, n_voc_val=2,
                                    n_overlap=0, size=(20, 24))
    gone = broken.sbd / "cls" / f"{broken.ids['sbd_train'][1]}.mat"
    gone.unlink()
    with pytest.raises(DataError, match=gone.name):
        build_split("sbd", "train", broken.root)
    image = broken.voc / "JPEGImages" / f"{broken.ids['voc_train'][0]}.jpg"
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(image)
    with pytest.raises(DataError, match=f"{image.name}.*5x5"):
        build_split("voc", "train", broken.root)[0]


def test_pad_collate_pads_with_ignore():
    a = (torch.ones(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64))
    b = (torch.ones(3, 6, 3), torch.ones(6, 3, dtype=torch.int64))
    images, labels = pad_collate([a, b])
    assert images.shape == (2, 3, 6, 5) and labels.shape == (2, 6, 5)
    assert labels[0, 4:].eq(IGNORE_INDEX).all() and labels[1, :, 3:].eq(IGNORE_INDEX).all()
    assert images[0, :, 4:].eq(0).all() and labels[1, :, :3].eq(1).all()


# ----------------------------------------------------------------------------- input conventions

def test_input_conventions():
    rgb = np.random.default_rng(0).integers(0, 256, size=(4, 6, 3)).astype(np.uint8)
    caffe = CONVENTIONS["caffe"].to_tensor(rgb)
    # BGR order, 0-255, minus the Caffe mean
    torch.testing.assert_close(caffe[0], torch.from_numpy(rgb[..., 2]).float() - 104.00699)
    tv = CONVENTIONS["torchvision"].to_tensor(rgb)
    torch.testing.assert_close(tv[0], (torch.from_numpy(rgb[..., 0]).float() / 255 - 0.485) / 0.229)
    for conv in CONVENTIONS.values():
        np.testing.assert_array_equal(conv.to_image(conv.to_tensor(rgb)), rgb)


# ----------------------------------------------------------------------------- backbone weights

def test_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(BackboneWeightsError) as err:
        resolve_backbone("vgg16")
    message = str(err.value)
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "--random-init" in message and "--caffe-weights" in message
    cached = tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    found = resolve_backbone("vgg16")
    assert found.path == cached and found.convention == "torchvision"
    with pytest.raises(BackboneWeightsError, match="--random-init"):
        resolve_backbone("vgg-tiny")
    assert resolve_backbone("vgg-tiny", random_init=True).path is None
    with pytest.raises(ValueError, match="exclude"):
        resolve_backbone("vgg16", backbone=str(cached), random_init=True)
    with pytest.raises(BackboneWeightsError, match="nope.pth"):
        resolve_backbone("vgg16", caffe_weights=str(tmp_path / "nope.pth"))


def test_weight_files_in_every_accepted_layout(tmp_path):
    from safetensors.torch import save_file
    state = build_vgg("vgg-tiny").state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("wrapped.pth", "w.safetensors"):
        loaded = load_backbone_state(BackboneSource("torchvision", tmp_path / name, "torchvision"), "vgg-tiny")
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    (tmp_path / "bad.pth").write_bytes(b"garbage")
    with pytest.raises(BackboneWeightsError, match="bad.pth"):
        load_backbone_state(BackboneSource("torchvision", tmp_path / "bad.pth", "torchvision"), "vgg-tiny")


def test_caffe_layer_names_map_to_torchvision_keys(tmp_path):
    state = build_vgg("vgg-tiny").state_dict()
    names = {"features.0": "conv1_1", "features.3": "conv2_1", "features.6": "conv3_1", "features.9": "conv4_1",
             "features.12": "conv5_1", "classifier.0": "fc6", "classifier.3": "fc7", "classifier.6": "fc8"}
    caffe = {}
    for key, value in state.items():
        layer, _, param = key.rpartition(".")
        caffe[f"{names[layer]}.{param}"] = value
    caffe["fc6.weight"] = caffe["fc6.weight"].reshape(64, 32, 7, 7)  # stored as a convolution
    back = caffe_to_torchvision_keys(caffe, "vgg-tiny")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    torch.save(caffe, tmp_path / "caffe.pth")
    source = resolve_backbone("vgg16", caffe_weights=str(tmp_path / "caffe.pth"))
    assert source.kind == "caffe" and source.convention == "caffe"
    assert load_backbone_state(source, "vgg-tiny").keys() == state.keys()
    with pytest.raises(BackboneWeightsError, match="conv9_1"):
        caffe_to_torchvision_keys({"conv9_1.weight": torch.zeros(1)}, "vgg-tiny")
