"""The mask file: round trip, size, safety, refusal of another backbone; the multi-task wrapper;
accounting."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from common.accounting import parameter_ratio, sparsity, task_cost
from common.entropy import binary_entropy
from common.maskfile import MaskFileError, load_masks, read_mask_metadata, save_masks
from common.masking import mask_entries, masked_modules, piggyback
from common.multitask import MultiTaskModel
from common.plots import plot_sparsity
from common.schemes import SCHEMES


def backbone(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def task_model(base, num_classes, seed, train_bn=False, scheme="binary"):
    model = copy.deepcopy(base)
    model[8] = nn.Linear(32, num_classes)
    piggyback(model, skip=("8",), train_bn=train_bn, scheme=scheme)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.mask_real.copy_(torch.rand(layer.weight.shape, generator=g) * 0.03 - 0.01)
        for e in mask_entries(model):  # scheme extras away from their start
            for t in e.extras.values():
                t.add_(torch.randn(t.shape, generator=g) * 0.1)
        for p in model[8].parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if train_bn:
            model[1].running_mean.copy_(torch.randn(16, generator=g))
            model[1].weight.copy_(torch.rand(16, generator=g) + 0.5)
    return model.eval()


def masks_of(model):
    return {n: m.binary_mask() for n, m in masked_modules(model)}


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path, scheme, compress):
    base = backbone()
    trained = task_model(base, 4, seed=1, train_bn=True, scheme=scheme)
    path = save_masks(trained, tmp_path / "task.safetensors", task="svhn", arch="tiny", compress=compress)
    fresh = task_model(base, 4, seed=99, train_bn=True, scheme=scheme)
    meta = load_masks(fresh, path)
    assert meta["task"] == "svhn" and meta["arch"] == "tiny" and meta["scheme"] == scheme
    for name, m in masks_of(trained).items():
        assert torch.equal(masks_of(fresh)[name], m)
    assert torch.equal(fresh[8].weight, trained[8].weight)
    assert torch.equal(fresh[1].running_mean, trained[1].running_mean)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    assert [p.name for p in tmp_path.iterdir()] == ["task.safetensors"]  # no temporary file left


def test_file_is_about_one_bit_per_masked_weight_and_no_pickle(tmp_path):
    torch.manual_seed(0)
    model = piggyback(nn.Sequential(nn.Conv2d(64, 128, 3), nn.Conv2d(128, 128, 3), nn.Linear(128, 1000)))
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.mask_real.uniform_(-0.01, 0.02)
    path = save_masks(model, tmp_path / "m.safetensors", task="t")
    n = task_cost(model)["masked_weights"]
    assert n == 64 * 128 * 9 + 128 * 128 * 9 + 128 * 1000
    assert path.stat().st_size * 8 / n <= 1.05
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    json.loads(raw[8:8 + header_len])  # safetensors: a JSON header and raw bytes, nothing to unpickle


def test_refuses_other_backbone_and_other_shapes(tmp_path):
    trained = task_model(backbone(0), 4, seed=1)
    path = save_masks(trained, tmp_path / "t.safetensors", task="a")
    with pytest.raises(MaskFileError, match="another backbone"):
        load_masks(task_model(backbone(1), 4, seed=2), path)
    other = piggyback(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2)))
    with pytest.raises(MaskFileError, match="does not fit"):
        load_masks(other, path)
    with pytest.raises(MaskFileError, match="shape"):
        load_masks(task_model(backbone(0), 7, seed=2), path)  # head of another class count


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_mask_metadata(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(MaskFileError, match="junk.safetensors"):
        read_mask_metadata(junk)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MaskFileError, match="not a piggyback mask file"):
        read_mask_metadata(tmp_path / "other.safetensors")
    model = task_model(backbone(), 3, seed=0)
    with pytest.raises(TypeError, match="JSON"):
        save_masks(model, tmp_path / "x.safetensors", when=object())
    assert not (tmp_path / "x.safetensors").exists()


def test_multitask_switches_without_copying_backbone(tmp_path):
    base = backbone()
    a = task_model(base, 4, seed=1)
    b = task_model(base, 7, seed=2, train_bn=True)
    save_masks(a, tmp_path / "a.safetensors", task="a")
    save_masks(b, tmp_path / "b.safetensors", task="b")
    shared = piggyback(copy.deepcopy(base), skip=("8",), train_bn=True).eval()
    mt = MultiTaskModel(shared)
    mt.add_task("a", tmp_path / "a.safetensors")
    mt.add_task("b", tmp_path / "b.safetensors")
    mt.add_backbone_task("source")
    ptrs = {n: m.weight.data_ptr() for n, m in masked_modules(shared)}
    x = torch.randn(3, 3, 8, 8)
    plain = base.eval()
    with torch.no_grad():
        for _ in range(2):
            mt.set_task("a")
            assert torch.equal(mt(x), a(x))
            mt.set_task("b")
            assert torch.equal(mt(x), b(x))
            mt.set_task("source")
            assert torch.equal(mt(x), plain(x))
    assert ptrs == {n: m.weight.data_ptr() for n, m in masked_modules(shared)}
    with pytest.raises(KeyError, match="loaded tasks"):
        mt.set_task("c")
    # a task can also come straight from a trained model over the same backbone
    mt.add_task("a-model", a)
    mt.set_task("a-model")
    with torch.no_grad():
        assert torch.equal(mt(x), a(x))
    with pytest.raises(MaskFileError, match="another backbone"):
        mt.add_task("foreign", task_model(backbone(seed=5), 4, seed=1))
    mt.to(torch.float64)
    mt.set_task("b")
    with torch.no_grad():
        torch.testing.assert_close(mt(x.double()), b.double()(x.double()))


def test_sparsity_and_parameter_ratio(tmp_path):
    model = piggyback(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)))
    with torch.no_grad():
        model[0].mask_real[:2] = 0.0    # 8 of 20 off
        model[1].mask_real[0, :] = 0.0  # 5 of 10 off
    s = sparsity(model)
    assert s["layers"] == {"0": 0.4, "1": 0.5} and s["total"] == pytest.approx(13 / 30)
    assert parameter_ratio(1000, [{"mask_bits": 1000}] * 9) == pytest.approx(1.28125)
    assert parameter_ratio(1000, [{"mask_bits": 1000, "extra_params": 10}]) == pytest.approx(1 + 1 / 32 + 10 / 1000)
    assert binary_entropy(0.5) == 1.0 and binary_entropy(0.0) == 0.0
    png = plot_sparsity({"svhn": s["layers"], "dtd": {"0": 0.1, "1": 0.2}}, tmp_path / "fig" / "sparsity.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------ files from others

def _rewrite(path, out, header_edit=None, tensor_edit=None):
    """Copy a mask file with its header and/or tensors edited, as someone might."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    tensors = load_file(str(path))
    if header_edit:
        header_edit(header)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, str(out), metadata=header)
    return out


def _drop(key):
    return lambda h: h.pop(key)


def _set(key, value):
    return lambda h: h.__setitem__(key, value)


def _edit_layer(field, value):
    def edit(h):
        layers = json.loads(h["layers"])
        layers[next(iter(layers))][field] = value
        h["layers"] = json.dumps(layers)
    return edit


HEADER_EDITS = {
    "no layers": (_drop("layers"), r"'layers' is missing"),
    "no user": (_drop("user"), r"'user' is missing"),
    "no threshold": (_drop("threshold"), r"'threshold' is missing"),
    "threshold text": (_set("threshold", "abc"), r"'threshold' = 'abc' is not a number"),
    "negative threshold": (_set("threshold", "-0.005"), r"'threshold' = '-0.005'.*positive"),
    "layers not json": (_set("layers", "{not json"), r"'layers' is not valid JSON"),
    "user not object": (_set("user", "[1, 2]"), r"'user' holds a list"),
    "scheme": (_set("scheme", "yes"), r"'scheme' = 'yes'"),
    "train_bn": (_set("train_bn", "yes"), r"'train_bn' = 'yes'"),
    "skip": (_set("skip", '"8"'), r"'skip' holds a str"),
    "fingerprint": (_set("fingerprint", "xyz"), r"'fingerprint' = 'xyz'"),
    "version": (_set("format_version", "7"), r"version '7'"),
    "shape": (_edit_layer("shape", [16, 3, 3, 4]), r"'mask/0' has 54 bytes.*shape \[16, 3, 3, 4\]"),
    "same-size shape": (_edit_layer("shape", [16, 3, 9]), r"does not fit.*'0', \[16, 3, 9\]"),
    "bad shape": (_edit_layer("shape", [16, -3]), r"layer '0' has shape \[16, -3\]"),
    "encoding": (_edit_layer("encoding", "zip"), r"layer '0' has encoding 'zip'"),
}


@pytest.mark.parametrize("edit", list(HEADER_EDITS))
def test_edited_headers_are_refused_naming_file_and_key(tmp_path, edit):
    trained = task_model(backbone(), 4, seed=1)
    good = save_masks(trained, tmp_path / "good.safetensors", task="a")
    change, message = HEADER_EDITS[edit]
    bad = _rewrite(good, tmp_path / "bad.safetensors", header_edit=change)
    fresh = task_model(backbone(), 4, seed=2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(MaskFileError, match=message) as info:
        load_masks(fresh, bad)
    assert "bad.safetensors" in str(info.value)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # nothing loaded


def test_edited_tensors_are_refused_before_anything_is_loaded(tmp_path):
    trained = task_model(backbone(), 4, seed=1, train_bn=True)
    good = save_masks(trained, tmp_path / "good.safetensors", task="a")
    fresh = task_model(backbone(), 4, seed=2, train_bn=True)
    cases = {
        "head retyped": (lambda t: t.__setitem__("state/8.weight", t["state/8.weight"].half()), r"'8.weight' is torch.float16"),
        "mask cut": (lambda t: t.__setitem__("mask/0", t["mask/0"][:-1].clone()), r"'mask/0' has \d+ bytes"),
        "mask retyped": (lambda t: t.__setitem__("mask/0", t["mask/0"].float()), r"'mask/0' is torch.float32"),
        "mask missing": (lambda t: t.pop("mask/3"), r"holds no tensor 'mask/3'"),
        "extra tensor": (lambda t: t.__setitem__("other", torch.zeros(2)), r"\['other'\]"),
        "nan head": (lambda t: t["state/8.bias"].fill_(float("nan")), r"'8.bias' holds non-finite"),
    }
    for name, (edit, message) in cases.items():
        bad = _rewrite(good, tmp_path / f"{name.replace(' ', '_')}.safetensors", tensor_edit=edit)
        with pytest.raises(MaskFileError, match=message):
            load_masks(fresh, bad)
        mt = MultiTaskModel(copy.deepcopy(fresh))
        if name != "nan head":
            with pytest.raises(MaskFileError):
                mt.add_task("x", bad)


def test_a_plain_model_is_converted_from_the_file_alone(tmp_path):
    base = backbone()
    for i, scheme in enumerate(SCHEMES):
        train_bn = bool(i % 2)
        trained = task_model(base, 4, seed=1, train_bn=train_bn, scheme=scheme)
        path = save_masks(trained, tmp_path / "t.safetensors", task="a")
        meta = read_mask_metadata(path)
        assert meta["skip"] == ["8"] and meta["train_bn"] is train_bn
        assert meta["scheme"] == scheme
        plain = copy.deepcopy(base)  # its classifier still has 10 classes; the task has 4
        load_masks(plain, path)
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert torch.equal(plain.eval()(x), trained(x))


def test_classifier_accessor_on_torchvision_and_timm():
    import timm
    import torchvision
    from common.heads import get_classifier, reset_classifier
    cases = [(torchvision.models.resnet18(), "fc"), (torchvision.models.mobilenet_v2(width_mult=0.35), "classifier.1"),
             (torchvision.models.vgg11(), "classifier.6"),
             (timm.create_model("mobilenetv3_small_050", pretrained=False), "classifier")]
    for model, name in cases:
        assert get_classifier(model)[0] == name
        assert reset_classifier(model, 7) == name
        assert get_classifier(model)[1].out_features == 7


def _as_four_tensors(path, out):
    """The mask file at ``path`` rewritten in the affine scheme's earlier layout: a, b, c, d
    as four tensors per layer (``extra/<layer>/a`` ...), the header listing them."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["layers"])
    for name, info in layers.items():
        abcd = tensors.pop(f"extra/{name}/abcd")
        for k, row in zip("abcd", abcd.unbind(0)):
            tensors[f"extra/{name}/{k}"] = row.contiguous()
        info["extras"] = {k: list(abcd.shape[1:]) for k in "abcd"}
    meta["layers"] = json.dumps(layers)
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("scheme", ["affine", "affine-channel"])
def test_affine_files_and_checkpoints_of_the_four_tensor_layout_still_load(tmp_path, scheme):
    from common.checkpoint import load_trainable_state, trainable_state
    from common.maskfile import read_mask_file
    base = backbone()
    trained = task_model(base, 4, seed=1, scheme=scheme)
    old = _as_four_tensors(save_masks(trained, tmp_path / "t.safetensors", task="svhn"), tmp_path / "old.safetensors")
    contents = read_mask_file(old)
    for e in mask_entries(trained):
        assert set(contents.extras[e.key]) == {"abcd"}
        assert torch.equal(contents.extras[e.key]["abcd"], e.extras["abcd"].detach())
        assert contents.meta["layers"][e.key]["extras"] == {"abcd": list(e.extras["abcd"].shape)}
    x = torch.randn(2, 3, 8, 8)
    fresh = task_model(base, 4, seed=99, scheme=scheme)
    load_masks(fresh, old)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)
    # a checkpoint's model state with mask_a ... mask_d
    state = trainable_state(trained)
    legacy = {}
    for k, t in state.items():
        if k.endswith("mask_abcd"):
            legacy.update({k[:-len("abcd")] + c: row.clone() for c, row in zip("abcd", t.unbind(0))})
        else:
            legacy[k] = t
    again = task_model(base, 4, seed=7, scheme=scheme)
    load_trainable_state(again, legacy)
    with torch.no_grad():
        torch.testing.assert_close(again(x), trained(x), rtol=0, atol=0)
