"""Mask schemes as one registered value: a scheme defined here, outside the toolkit, and
registered in one call trains, saves, loads into a plain network, folds, is counted and is
served by MultiTaskModel beside a binary task; and the affine scheme's transform, start and
gradients against an independent computation."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UsageError
from common.maskfile import load_masks, read_mask_file, save_masks
from common.masking import fold_masks, mask_entries, mask_parameters, piggyback, scheme_parameters
from common.multitask import MultiTaskModel
from common.schemes import SCHEMES, BinaryScheme, get_scheme, register_scheme


class HalvedScheme(BinaryScheme):
    """A binary mask whose off-entries keep half their weight, times a trained scale per
    layer: W' = s * W * (1 + m) / 2. Written with plain tensor arithmetic and a
    straight-through mask, as a user would."""

    name = "halved-test"
    summary = "off entries keep half their weight"
    extras = ("s",)
    extras_optimizer = "adam"
    extras_lr = 1e-3

    def masked_weight(self, weight, mask_real, threshold, extras=()):
        m = (mask_real >= threshold).to(weight.dtype)
        m = m + (mask_real - mask_real.detach())
        return extras[0] * weight * (1 + m) / 2

    def extras_shape(self, weight_shape):
        return (1,) * len(weight_shape)

    def init_extras(self, weight):
        return {"s": torch.ones(self.extras_shape(weight.shape), device=weight.device)}


@pytest.fixture
def halved():
    scheme = register_scheme(HalvedScheme())
    yield scheme
    SCHEMES.pop(scheme.name)


def net(seed=0, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def trained(scheme, seed, classes=4):
    model = piggyback(net(classes=classes), scheme=scheme, skip=("7",))
    opt = torch.optim.Adam(mask_parameters(model) + scheme_parameters(model) + list(model[7].parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        x = torch.randn(6, 3, 8, 8, generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(6) % classes).backward()
        opt.step()
    return model.eval()


def test_register_refuses_a_taken_or_bad_name():
    with pytest.raises(UsageError, match="already registered"):
        register_scheme(BinaryScheme())
    bad = HalvedScheme()
    bad.name = "no spaces"
    with pytest.raises(UsageError, match="name"):
        register_scheme(bad)
    with pytest.raises(UsageError, match="register"):
        register_scheme("binary")


def test_an_outside_scheme_trains_saves_loads_folds_and_is_served(halved, tmp_path):
    model = trained(halved.name, seed=1)
    assert all(t.grad is not None for t in scheme_parameters(model))
    assert any(float(t.detach()) != 1.0 for t in scheme_parameters(model))  # the scale trained
    path = save_masks(model, tmp_path / "halved.safetensors", task="h")
    contents = read_mask_file(path)
    assert contents.meta["scheme"] == halved.name and set(contents.extras) == {e.key for e in mask_entries(model)}
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        plain = net()  # a plain network, converted by the file alone
        load_masks(plain, path)
        torch.testing.assert_close(plain.eval()(x), want, rtol=0, atol=0)
        torch.testing.assert_close(fold_masks(model).eval()(x), want, rtol=1e-6, atol=1e-6)
    binary = trained("binary", seed=2, classes=3)
    save_masks(binary, tmp_path / "binary.safetensors", task="b")
    multi = MultiTaskModel(piggyback(net(), skip=("7",))).eval()
    multi.add_task("b", tmp_path / "binary.safetensors")
    multi.add_task("h", path)
    multi.add_task("h-live", model)
    with torch.no_grad():
        for name, ref in (("h", model), ("b", binary), ("h-live", model), ("b", binary), ("h", model)):
            multi.set_task(name)
            torch.testing.assert_close(multi(x), ref(x), rtol=0, atol=0)


def test_an_outside_scheme_through_a_training_command(halved, tmp_path):
    """classification.train --scheme NAME with a scheme registered in this process."""
    from PIL import Image

    from classification import train as train_cli
    from common.methods import load_task
    import timm
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in range(2):
            folder = tmp_path / "data" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = (torch.rand(12, 12, 3, generator=g) * 60 + 150 * c).to(torch.uint8).numpy()
                Image.fromarray(img).save(folder / f"{i}.png")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()},
              str(tmp_path / "w.safetensors"), metadata={"arch": "test_resnet"})
    cfg = train_cli.parse_config(["--data-root", str(tmp_path / "data"), "--weights", str(tmp_path / "w.safetensors"),
                                  "--out", str(tmp_path / "run"), "--scheme", halved.name, "--epochs", "1",
                                  "--size", "16", "--eval-resize", "16", "--batch-size", "4", "--workers", "0",
                                  "--device", "cpu"])
    assert (cfg.extras_optimizer, cfg.extras_lr) == ("adam", 1e-3)  # the scheme's own defaults
    metrics = train_cli.main(cfg)
    assert read_mask_file(tmp_path / "run" / "masks.safetensors").meta["scheme"] == halved.name
    from classification.models import create_model
    model, _ = create_model("test_resnet", 2, tmp_path / "w.safetensors")
    assert load_task(tmp_path / "run", model)["scheme"] == halved.name
    assert 0 <= metrics["top1"] <= 100


# ------------------------------------------------------------------------- affine

def _affine_reference(w, m, a, b, c, d):
    """W' of the affine scheme in plain arithmetic, for a hard mask m."""
    return a * w + b * (m * w) + c * m + d


@pytest.mark.parametrize("name", ["affine", "affine-channel"])
def test_affine_starts_as_the_backbone_and_contains_piggyback(name):
    x = torch.randn(2, 3, 8, 8)
    base = net().eval()
    start = piggyback(copy.deepcopy(base), scheme=name, skip=("7",), mask_init="constant").eval()
    with torch.no_grad():
        torch.testing.assert_close(start(x), base(x), rtol=0, atol=0)  # every entry on: the backbone
    binary = trained("binary", seed=3)
    affine = piggyback(net(), scheme=name, skip=("7",))
    with torch.no_grad():
        for e, f in zip(mask_entries(affine), mask_entries(binary)):
            e.mask_real.copy_(f.mask_real)  # the same masks, a = c = d = 0, b = 1: piggyback
        affine[7].load_state_dict(binary[7].state_dict())
        torch.testing.assert_close(affine.eval()(x), binary(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["affine", "affine-channel"])
def test_affine_gradients_match_an_independent_computation(name):
    torch.manual_seed(0)
    weight = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    mask_real = (torch.rand(weight.shape, dtype=torch.float64) * 0.02 - 0.005).requires_grad_()
    scheme = get_scheme(name)
    extras = [(t.double() + 0.3 * torch.randn(t.shape, dtype=torch.float64)).requires_grad_()
              for t in scheme.init_extras(weight).values()]
    upstream = torch.randn(weight.shape, dtype=torch.float64)
    out = scheme.masked_weight(weight, mask_real, 5e-3, extras)
    (out * upstream).sum().backward()
    m = (mask_real.detach() >= 5e-3).double()
    ref_extras = [t.detach().clone().requires_grad_() for t in extras]
    ref = _affine_reference(weight, m, *ref_extras)
    torch.testing.assert_close(out.detach(), ref.detach())
    (ref * upstream).sum().backward()
    for got, want in zip(extras, ref_extras):
        torch.testing.assert_close(got.grad, want.grad)
    a, b, c, d = (t.detach() for t in extras)
    # eq. 7 on W': dE/dW' times what switching the entry on changes, b W + c
    torch.testing.assert_close(mask_real.grad, upstream * (b * weight + c))


def test_affine_storage_is_about_one_bit_per_weight(tmp_path):
    from decathlon.accounting import mask_file_cost
    from decathlon.models import create_model
    model = piggyback(create_model("wrn28_4", 10), scheme="affine", skip=("fc",))
    path = save_masks(model, tmp_path / "a.safetensors")
    cost = mask_file_cost(path)
    layers = len(mask_entries(model))
    assert cost["scheme_params"] == 4 * layers and cost["scheme"] == "affine"
    bits = (cost["mask_bits"] + 32 * cost["scheme_params"]) / cost["masked_weights"]
    assert 1.0 < bits <= 1.01


def test_help_lists_every_registered_scheme_with_its_cost():
    from classification.train import get_args_parser
    from common.schemes import SCHEMES
    text = get_args_parser().format_help()
    assert "mask schemes (--scheme" in text
    for name, scheme in SCHEMES.items():
        assert f"  {name}: {scheme.summary}; stores {scheme.cost}" in text
    assert "four float32 values per masked layer" in text and "four float32 values per output channel" in text


def test_affine_shifts_learn_in_units_of_their_layers_weights():
    """c and d are added to the weight: their learning rate is the extras' rate times the
    RMS of the layer's frozen weight; a and b (factors) take the rate itself."""
    import torch.nn as nn
    from types import SimpleNamespace
    from common.masking import mask_entries
    from common.methods import MaskSettings, build_optimizers, get_method
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.mul_(10)  # a layer at ten times the other's scale
    prepared = get_method("piggyback").prepare(model, head=("4",), masks=MaskSettings(scheme="affine"),
                                               train_bn=False)
    cfg = SimpleNamespace(optimizer="adam", lr=1e-4, weight_decay=0.0, head_optimizer="adam", head_lr=1e-3,
                          head_weight_decay=0.0, extras_optimizer="adam", extras_lr=1e-3, momentum=0.9)
    extras = build_optimizers(prepared, cfg)["extras"]
    lr_of = {id(p): g["lr"] for g in extras.param_groups for p in g["params"]}
    for entry in mask_entries(model):
        rms = float(entry.weight.pow(2).mean().sqrt())
        assert lr_of[id(entry.extras["a"])] == lr_of[id(entry.extras["b"])] == pytest.approx(1e-3)
        assert lr_of[id(entry.extras["c"])] == lr_of[id(entry.extras["d"])] == pytest.approx(1e-3 * rms)
    scales = sorted({g["lr"] for g in extras.param_groups})
    assert len(scales) == 3 and scales[2] == pytest.approx(1e-3)
    rms = [float(e.weight.pow(2).mean().sqrt()) for e in mask_entries(model)]
    assert scales[1] / scales[0] == pytest.approx(max(rms) / min(rms)) and max(rms) / min(rms) > 3
