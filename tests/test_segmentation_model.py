"""FCN-32s construction: fc6/fc7 surgery, bilinear upsampling, geometry, masking, storage."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import UsageError, WeightsFileError
from common.masking import MaskedConv2d, mask_parameters, masked_modules, piggyback, task_parameters
from segmentation.model import (ARCHS, CROP_OFFSET, NEW_LAYERS, bilinear_kernel, build_fcn32s, build_vgg,
                                get_arch, vgg_to_fcn_state_dict)
from segmentation.report import format_storage, storage_report


@pytest.fixture(scope="module")
def tiny_vgg():
    torch.manual_seed(0)
    return build_vgg("vgg-tiny").eval()


def test_surgery_matches_linear_layers_on_a_7x7_map(tiny_vgg):
    spec = get_arch("vgg-tiny")
    state = vgg_to_fcn_state_dict(tiny_vgg.state_dict())
    fc6 = nn.Conv2d(spec.last_channels, spec.fc_width, 7)
    fc7 = nn.Conv2d(spec.fc_width, spec.fc_width, 1)
    fc6.load_state_dict({"weight": state["fc6.weight"], "bias": state["fc6.bias"]})
    fc7.load_state_dict({"weight": state["fc7.weight"], "bias": state["fc7.bias"]})
    x = torch.randn(3, spec.last_channels, 7, 7)
    cls = tiny_vgg.classifier
    linear = cls[3](cls[1](cls[0](torch.flatten(x, 1))))
    conv = fc7(F.relu(fc6(x))).flatten(1)
    torch.testing.assert_close(conv, linear, rtol=1e-5, atol=1e-5)


def test_surgery_slides_the_classifier_over_larger_maps(tiny_vgg):
    """On a 9x9 map every output position is the linear fc6 of its 7x7 window."""
    spec = get_arch("vgg-tiny")
    state = vgg_to_fcn_state_dict(tiny_vgg.state_dict())
    x = torch.randn(1, spec.last_channels, 9, 11)
    conv = F.conv2d(x, state["fc6.weight"], state["fc6.bias"])
    assert conv.shape[-2:] == (3, 5)
    for i in range(3):
        for j in range(5):
            window = x[:, :, i:i + 7, j:j + 7].flatten(1)
            torch.testing.assert_close(conv[:, :, i, j], tiny_vgg.classifier[0](window), rtol=1e-5, atol=1e-5)


def test_surgery_is_pure_and_drops_the_imagenet_classifier(tiny_vgg):
    original = {k: v.clone() for k, v in tiny_vgg.state_dict().items()}
    out = vgg_to_fcn_state_dict(original)
    assert all(torch.equal(original[k], v) for k, v in tiny_vgg.state_dict().items())
    assert set(original) - set(out) == {f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    assert {"fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"} <= set(out)
    out["fc6.weight"].zero_()
    assert original["classifier.0.weight"].abs().sum() > 0  # no shared storage


def test_surgery_refuses_bad_state_dicts(tiny_vgg):
    state = tiny_vgg.state_dict()
    with pytest.raises(WeightsFileError, match="classifier.0.weight"):
        vgg_to_fcn_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.0")})
    bad = dict(state, **{"classifier.0.weight": torch.zeros(8, 50)})
    with pytest.raises(WeightsFileError, match="channels\\*7\\*7"):
        vgg_to_fcn_state_dict(bad)


def test_builder_loads_backbone_and_initialises_new_layers(tiny_vgg):
    model = build_fcn32s("vgg-tiny", backbone_state=tiny_vgg.state_dict())
    assert torch.equal(model.features[0].weight, tiny_vgg.features[0].weight)
    assert model.features[0].padding == (100, 100)
    assert all(m.ceil_mode for m in model.features if isinstance(m, nn.MaxPool2d))
    assert torch.equal(model.fc7.weight.flatten(1), tiny_vgg.classifier[3].weight)
    assert model.score_fr.weight.abs().sum() == 0 and model.score_fr.bias.abs().sum() == 0
    assert not model.upscore.weight.requires_grad
    assert build_fcn32s("vgg-tiny", learn_upsample=True).upscore.weight.requires_grad


def test_builder_refuses_weights_of_another_architecture(tiny_vgg):
    with torch.device("meta"), pytest.raises(WeightsFileError, match="do not fit"):
        build_fcn32s("vgg16", backbone_state=tiny_vgg.state_dict())
    with pytest.raises(UsageError, match="'vgg19'; valid names: vgg-tiny, vgg16"):
        build_fcn32s("vgg19")


def test_bilinear_kernel_keeps_constants_and_ramps():
    up = nn.ConvTranspose2d(3, 3, 64, stride=32, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(3, 64))
    const = torch.full((1, 3, 5, 4), 2.5)
    out = up(const)
    # Away from the 32-pixel border every output pixel gets two taps summing to one.
    torch.testing.assert_close(out[..., 32:-32, 32:-32], torch.full_like(out[..., 32:-32, 32:-32], 2.5))
    ramp = torch.arange(6, dtype=torch.float32).view(1, 1, 1, 6).expand(1, 3, 4, 6).contiguous()
    row = up(ramp)[0, 0, 40, 32:-32]
    torch.testing.assert_close(row[1:] - row[:-1], torch.full_like(row[1:], 1 / 32))
    # Each class maps only to itself.
    w = bilinear_kernel(3, 64)
    assert w[0, 1].abs().sum() == 0 and w[2, 2].sum() > 0
    torch.testing.assert_close(w[0, 0].sum(), torch.tensor(32.0 * 32.0))


@pytest.mark.parametrize("size", [(1, 1), (33, 47), (65, 17), (100, 101)])
def test_output_size_equals_input_size(size):
    torch.manual_seed(0)
    model = build_fcn32s("vgg-tiny").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 21, *size)
    assert CROP_OFFSET == 19


def test_piggyback_masks_backbone_and_fc_layers_only():
    model = piggyback(build_fcn32s("vgg-tiny"), skip=NEW_LAYERS)
    names = [n for n, _ in masked_modules(model)]
    convs = sum(1 for c in ARCHS["vgg-tiny"].cfg if c != "M")
    assert len(names) == convs + 2 and "fc6" in names and "fc7" in names
    assert isinstance(model.fc6, MaskedConv2d)
    assert not any(n.startswith(NEW_LAYERS) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.mask_real" for n in names} | {"score_fr.weight", "score_fr.bias"}
    assert len(task_parameters(model)) == 2 and len(mask_parameters(model)) == len(names)


def test_mixed_training_step_keeps_backbone_bit_identical():
    torch.manual_seed(0)
    model = piggyback(build_fcn32s("vgg-tiny"), skip=NEW_LAYERS)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("mask_real")
              and not k.startswith(NEW_LAYERS)}
    # score_fr starts at zero, so masks only see a gradient once it has moved.
    with torch.no_grad():
        model.score_fr.weight.normal_(0, 0.1)
    model.train()
    out = model(torch.randn(2, 3, 40, 36))
    F.cross_entropy(out, torch.randint(0, 21, (2, 40, 36))).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert model.upscore.weight.grad is None
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_storage_report_matches_the_paper_for_vgg16():
    with torch.device("meta"):
        model = piggyback(build_fcn32s("vgg16"), skip=NEW_LAYERS)
        plain = build_fcn32s("vgg16")
    report = storage_report(model)
    assert report["masked_weights"] == 134_248_128
    assert report["new_layer_params"] == 86_037 + 1_806_336
    assert round(report["mask_mb"], 2) == 16.78 and round(report["new_layers_mb"], 2) == 7.57
    assert 500 < report["full_fcn_mb"] < 560
    finetune = storage_report(plain)
    assert finetune["mask_mb"] == 0 and finetune["task_mb"] == finetune["full_fcn_mb"] == report["full_fcn_mb"]


def test_storage_report_counts_the_affine_scalars_with_the_task():
    with torch.device("meta"):
        binary = piggyback(build_fcn32s("vgg16"), skip=NEW_LAYERS)
        affine = piggyback(build_fcn32s("vgg16"), skip=NEW_LAYERS, scheme="affine")
    b, a = storage_report(binary), storage_report(affine)
    layers = sum(1 for n, m in affine.named_modules() if hasattr(m, "mask_real"))
    assert a["scheme_params"] == 4 * layers == 4 * 15 and b["scheme_params"] == 0  # 13 convs, fc6, fc7
    assert a["fcn_params"] == b["fcn_params"]  # the scalars are the task's, not the network's
    assert a["task_mb"] == pytest.approx(b["task_mb"] + 4 * 4 * layers / 1e6)
    assert "scheme" in format_storage(a) and "scheme" not in format_storage(b)
