"""Masked layers and the converter: eq. 4-7, frozen backbone, folding, conversion of real models."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import PiggybackError, UsageError
from common.masking import (MaskedConv2d, MaskedLayer, MaskedLinear, binarize, fold_masks,
                            mask_entries, mask_parameters, masked_modules, piggyback, set_binary_mask,
                            task_parameters)


def small_cnn(num_classes=5):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes))


def test_binarize_threshold_is_inclusive_and_ternary_uses_two_cutoffs():
    mr = torch.tensor([-0.02, -0.005, -0.004, 0.0, 0.0049, 0.005, 0.02])
    assert binarize(mr, 0.005).tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert binarize(mr, 0.005, "ternary").tolist() == [-1, -1, 0, 0, 0, 1, 1]


def test_linear_mask_gradient_is_eq7():
    torch.manual_seed(1)
    layer = piggyback(nn.Sequential(nn.Linear(6, 4)))[0]
    assert isinstance(layer, MaskedLinear)
    with torch.no_grad():
        layer.mask_real.uniform_(-0.01, 0.02)  # some entries below threshold: gradient still flows
    x = torch.randn(3, 6)
    dy = torch.randn(3, 4)  # dE/dy
    (layer(x) * dy).sum().backward()
    expected = (dy.t() @ x) * layer.weight  # eq. 7: (dy x^T) * W, summed over the batch
    torch.testing.assert_close(layer.mask_real.grad, expected)
    assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_conv_mask_gradient_is_eq7(stride, padding):
    torch.manual_seed(2)
    layer = piggyback(nn.Sequential(nn.Conv2d(3, 5, 3, stride=stride, padding=padding)))[0]
    assert isinstance(layer, MaskedConv2d)
    with torch.no_grad():
        layer.mask_real.uniform_(-0.01, 0.02)
    x = torch.randn(2, 3, 7, 7)
    y = layer(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    # by hand: dE/dW_eff = sum over batch and positions of dy * unfolded input patches
    cols = F.unfold(x, 3, padding=padding, stride=stride)            # (B, C*k*k, L)
    grad_w = torch.einsum("bol,bkl->ok", dy.flatten(2), cols).view_as(layer.weight)
    torch.testing.assert_close(layer.mask_real.grad, grad_w * layer.weight, rtol=1e-4, atol=1e-5)


def test_threshold_switches_exactly_the_right_weights_off():
    torch.manual_seed(3)
    layer = piggyback(nn.Sequential(nn.Linear(10, 7)))[0]
    values = torch.tensor([-1.0, 0.0, 0.004999, 0.005, 0.006, 1.0])
    with torch.no_grad():
        layer.mask_real.copy_(values[torch.randint(0, 6, layer.weight.shape)])
    keep = layer.mask_real >= 0.005
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * keep, layer.bias), rtol=0, atol=0)
    assert torch.equal(layer.binary_mask().bool(), keep)


def test_all_ones_mask_reproduces_backbone_exactly():
    plain = small_cnn().eval()
    masked = piggyback(copy.deepcopy(plain)).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(plain(x), masked(x))
    assert torch.equal(plain(x), masked(x))  # with autograd on too


def test_backbone_bit_identical_after_training_with_frozen_bn():
    model = piggyback(small_cnn(), skip=("12",))  # final Linear is the task's new head
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("mask_real")}
    opt = torch.optim.Adam([{"params": mask_parameters(model), "lr": 1e-3},
                            {"params": task_parameters(model), "lr": 1e-2, "weight_decay": 1e-4}])
    model.train()
    assert not model[1].training and not model[4].training  # frozen BN stays in eval mode
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(torch.randn(8, 3, 12, 12)), torch.randint(0, 5, (8,)))
        loss.backward()
        for p in mask_parameters(model) + task_parameters(model):
            assert p.grad is not None  # every trainable parameter got a gradient
        opt.step()
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert sorted(changed) == ["12.bias", "12.weight"]  # only the head; every weight/bias/BN stat identical
    assert any((m.mask_real != 0.01).any() for _, m in masked_modules(model))


def test_train_bn_makes_batchnorm_task_state():
    model = piggyback(small_cnn(), train_bn=True, skip=("12",))
    bn = model[1]
    assert bn.weight.requires_grad and bn.weight in [p for p in task_parameters(model)]
    model.train()
    assert bn.training
    mean_before = bn.running_mean.clone()
    model(torch.randn(4, 3, 12, 12)).sum().backward()
    assert not torch.equal(mean_before, bn.running_mean)
    assert bn.weight.grad is not None
    assert model[0].weight.grad is None


def test_fold_masks_gives_plain_model_with_same_outputs():
    model = piggyback(small_cnn(), skip=("12",))
    with torch.no_grad():
        for _, layer in masked_modules(model):
            layer.mask_real.uniform_(-0.01, 0.02)
    model.eval()
    folded = fold_masks(model)
    assert not any(isinstance(m, MaskedLayer) for m in folded.modules())
    assert {type(m) for m in folded.modules() if isinstance(m, (nn.Conv2d, nn.Linear))} == {nn.Conv2d, nn.Linear}
    assert type(folded[1]) is nn.BatchNorm2d
    assert "mask_real" not in str(list(folded.state_dict()))
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=0, atol=0)
    # the masked model is untouched
    assert isinstance(model[0], MaskedConv2d) and model[0].mask_real.shape == model[0].weight.shape


def test_mask_inits_and_bad_arguments():
    m = piggyback(nn.Sequential(nn.Linear(100, 100)), mask_init="constant")[0]
    assert torch.all(m.mask_real == 1e-2)
    m = piggyback(nn.Sequential(nn.Linear(100, 100)), mask_init="uniform")[0]
    on = m.binary_mask().mean().item()
    assert 0.4 < on < 0.6  # centred on the threshold: about half switched off
    m = piggyback(nn.Sequential(nn.Linear(100, 100)), mask_init="weight", mask_scale=0.02)[0]
    assert m.mask_real.mean().item() == pytest.approx(0.02, rel=1e-4)
    ratio = m.mask_real / m.weight.abs()
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)
    with pytest.raises(ValueError, match="mask_init"):
        piggyback(nn.Sequential(nn.Linear(2, 2)), mask_init="gaussian")
    with pytest.raises(UsageError, match="nothere"):
        piggyback(nn.Sequential(nn.Linear(2, 2)), skip=("nothere",))
    already = piggyback(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="already"):
        piggyback(already)


def test_ternary_masks_and_set_binary_mask():
    layer = piggyback(nn.Sequential(nn.Linear(5, 3)), scheme="ternary")[0]
    target = torch.randint(-1, 2, layer.weight.shape).float()
    set_binary_mask(layer, target)
    assert torch.equal(layer.binary_mask(), target)
    x = torch.randn(2, 5)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * target, layer.bias))


def test_state_moves_with_to_and_appears_in_state_dict():
    model = piggyback(small_cnn(), skip=("12",))
    keys = model.state_dict().keys()
    assert "0.mask_real" in keys and "0.weight" in keys
    model.to(torch.float64)
    assert model[0].mask_real.dtype == torch.float64 and model[0].weight.dtype == torch.float64
    assert model(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.slow
def test_torchvision_vgg16_conversion():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None)
    model.classifier[6] = nn.Linear(4096, 10)
    piggyback(model, skip=("classifier.6",))
    names = [n for n, _ in masked_modules(model)]
    assert len(names) == 15 and "classifier.0" in names and "features.28" in names
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if not n.endswith("mask_real") and not n.startswith("classifier.6"))
    out = model(torch.randn(1, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (1, 10) and model.features[0].mask_real.grad is not None


def test_timm_resnet_conversion_and_depthwise():
    import timm
    torch.manual_seed(0)
    for name, head in (("resnet18", "fc"), ("mobilenetv3_small_050", "classifier")):
        plain = timm.create_model(name, pretrained=False, num_classes=7).eval()
        model = piggyback(copy.deepcopy(plain), skip=(head,)).eval()
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
        convs = [m for _, m in masked_modules(model) if isinstance(m, nn.Conv2d)]
        assert any(m.groups > 1 for m in convs) or name == "resnet18"
        model.train()
        model(x).sum().backward()
        assert all(m.mask_real.grad is not None for _, m in masked_modules(model))


def test_conv_subclass_with_its_own_forward():
    from timm.layers import Conv2dSame
    torch.manual_seed(0)
    plain = nn.Sequential(Conv2dSame(3, 4, 3, stride=2)).eval()
    model = piggyback(copy.deepcopy(plain))
    layer = model[0]
    assert isinstance(layer, MaskedLayer) and isinstance(layer, Conv2dSame)
    x = torch.randn(1, 3, 9, 9)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    with torch.no_grad():
        layer.mask_real[0] = -1.0
    y = model(x)
    assert torch.all(y[:, 0] == plain[0].bias[0])  # first filter switched off entirely
    y.sum().backward()
    assert layer.mask_real.grad is not None and "weight" in layer._parameters
    folded = fold_masks(model)
    assert type(folded[0]) is Conv2dSame
    torch.testing.assert_close(folded(x), y.detach())


def _reference_mask_grad(layer, x, dy):
    """eq. 7 computed without the masked layer's own machinery."""
    w = layer.weight.detach()
    m = (layer.mask_real.detach() >= layer.threshold).float().requires_grad_(True)
    (F.conv2d(x, w * m, layer.bias, padding=1) * dy).sum().backward()
    return m.grad


def test_masks_change_across_steps_and_gradients_stay_exact():
    torch.manual_seed(4)
    layer = piggyback(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)))[0]
    opt = torch.optim.Adam([layer.mask_real], lr=1e-2)
    for _ in range(3):  # the masked weight is recomputed every step after the mask changed
        x, dy = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
        opt.zero_grad()
        expected = _reference_mask_grad(layer, x, dy)
        (layer(x) * dy).sum().backward()
        torch.testing.assert_close(layer.mask_real.grad, expected)
        opt.step()
    assert (layer.binary_mask() == 0).any()  # masks really changed on the way


def test_several_forwards_before_one_backward():
    torch.manual_seed(5)
    layer = piggyback(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)))[0]
    with torch.no_grad():
        layer.mask_real.uniform_(-0.01, 0.02)
    x1, x2 = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    d1, d2 = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    y1 = layer(x1)
    y2 = layer(x2)
    ((y1 * d1).sum() + (y2 * d2).sum()).backward()
    expected = _reference_mask_grad(layer, x1, d1) + _reference_mask_grad(layer, x2, d2)
    torch.testing.assert_close(layer.mask_real.grad, expected)
    # a forward whose graph is dropped, then a normal step after train(): still exact
    layer(x1)
    layer.train()
    layer.mask_real.grad = None
    (layer(x2) * d2).sum().backward()
    torch.testing.assert_close(layer.mask_real.grad, _reference_mask_grad(layer, x2, d2))


@pytest.mark.parametrize("cls,args,x_shape", [
    (nn.Conv1d, (3, 4, 3), (2, 3, 9)),
    (nn.Conv3d, (3, 4, 3), (1, 3, 5, 5, 5)),
    (nn.ConvTranspose1d, (3, 4, 3), (2, 3, 7)),
    (nn.ConvTranspose2d, (3, 4, 3, 2), (2, 3, 5, 5)),
    (nn.ConvTranspose3d, (3, 2, 2), (1, 3, 3, 3, 3)),
])
def test_every_conv_type_is_masked_with_the_eq7_gradient(cls, args, x_shape):
    torch.manual_seed(6)
    plain = cls(*args)
    layer = piggyback(nn.Sequential(copy.deepcopy(plain)))[0]
    assert isinstance(layer, MaskedLayer) and isinstance(layer, cls)
    with torch.no_grad():
        layer.mask_real.uniform_(-0.01, 0.02)
    x = torch.randn(x_shape)
    y = layer(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    # reference: the plain layer with W*m as a leaf weight
    m = layer.binary_mask()
    ref = copy.deepcopy(plain)
    ref.weight = nn.Parameter(plain.weight.detach() * m)
    out = ref(x)
    torch.testing.assert_close(out, y.detach(), rtol=1e-5, atol=1e-6)
    (out * dy).sum().backward()
    torch.testing.assert_close(layer.mask_real.grad, ref.weight.grad * plain.weight, rtol=1e-4, atol=1e-6)


def test_attention_input_projection_is_masked():
    torch.manual_seed(7)
    for kdim in (None, 6):
        attn = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        model = piggyback(nn.ModuleList([attn]))
        masked = {e.key for e in mask_entries(model)}
        names = ({"0.in_proj_weight"} if kdim is None else {"0.q_proj_weight", "0.k_proj_weight", "0.v_proj_weight"})
        assert masked == names | {"0.out_proj"}
        with torch.no_grad():
            for e in mask_entries(model):
                e.mask_real.uniform_(-0.01, 0.02)
        q, k = torch.randn(2, 5, 8), torch.randn(2, 4, kdim or 8)
        out, _ = model[0](q, k, k)
        folded = fold_masks(model)
        assert type(folded[0]) is nn.MultiheadAttention
        torch.testing.assert_close(folded[0](q, k, k)[0], out, rtol=1e-5, atol=1e-6)
        out.sum().backward()
        assert all(e.mask_real.grad is not None and e.mask_real.grad.abs().sum() > 0 for e in mask_entries(model))


def test_unmasked_weights_are_named_in_a_warning():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.pos = nn.Parameter(torch.zeros(4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.embed(x) + self.pos)

    with pytest.warns(UserWarning, match=r"embed\.weight.*pos|pos.*embed\.weight"):
        model = piggyback(WithEmbedding())
    assert not model.embed.weight.requires_grad and not model.pos.requires_grad
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain CNN has nothing left unmasked: no warning
        piggyback(small_cnn(), skip=("12",))


def test_no_state_is_kept_between_calls():
    layer = piggyback(nn.Sequential(nn.Linear(6, 4)))[0]
    before = set(layer.__dict__)
    layer(torch.randn(2, 6)).sum().backward()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 6))
    assert set(layer.__dict__) == before


def test_errors_are_the_toolkit_errors():
    with pytest.raises(PiggybackError, match="threshold"):
        piggyback(nn.Sequential(nn.Linear(2, 2)), scheme="ternary", threshold=0.0)
    with pytest.raises(PiggybackError, match="scheme"):
        piggyback(nn.Sequential(nn.Linear(2, 2)), scheme="quaternary")
