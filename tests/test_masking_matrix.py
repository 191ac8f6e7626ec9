"""Every backbone x every PyTorch tool x every registered mask scheme: the masked model
must give the eq. 7 gradient and fold to a plain model with the same outputs, whichever
way it is run.

The reference gradient is computed without the masked layers: the model is folded to a
plain one whose weights are W' (W * m for plain masks), the gradient of the loss with
respect to those weights is taken by plain autograd, and the straight-through estimator
multiplies it by what switching the entry on changes, W'(m = 1) - W'(m = 0) (the frozen
W for plain masks: eq. 7).
"""
import copy
import io
import pickle

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from common.masking import fold_masks, is_piggybacked, mask_entries, piggyback
from common.schemes import SCHEMES


def _wrn():
    from decathlon.networks import create_model
    return create_model("wrn10_1", 5), ("fc",), (2, 3, 16, 16)


def _resnet18():
    import torchvision
    m = torchvision.models.resnet18(num_classes=5)
    return m, ("fc",), (2, 3, 32, 32)


def _mobilenet_v2():
    import torchvision
    m = torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.35)
    m.classifier[0].p = 0.0  # deterministic head; the masked part is what is tested
    return m, ("classifier",), (2, 3, 32, 32)


def _fcn_vgg():
    from segmentation.model import NEW_LAYERS, build_fcn32s
    return build_fcn32s("vgg-tiny", num_classes=4), NEW_LAYERS, (1, 3, 24, 24)


def _timm_same_padding():
    import timm
    m = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False, num_classes=5)
    from timm.layers import Conv2dSame
    assert any(isinstance(x, Conv2dSame) for x in m.modules())  # padding='same' convs are in the test
    return m, ("classifier",), (2, 3, 32, 32)


BACKBONES = {"wrn": _wrn, "resnet18": _resnet18, "mobilenet_v2": _mobilenet_v2, "fcn_vgg": _fcn_vgg,
             "timm_same": _timm_same_padding}


def _build(name, seed=0, scheme="binary"):
    torch.manual_seed(seed)
    model, skip, shape = BACKBONES[name]()
    piggyback(model, skip=skip, scheme=scheme)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for e in mask_entries(model):  # about a third of every mask switched off
            e.mask_real.copy_(torch.rand(e.mask_real.shape, generator=g) * 0.015)
            for t in e.extras.values():  # scheme extras away from their start
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    x = torch.randn(shape, generator=g)
    return model.eval(), x


def _loss(out):
    out = out if isinstance(out, torch.Tensor) else out[0]
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out * w).sum()


def _switch_effect(e):
    """W'(m = 1) - W'(m = 0) of a masked weight, from the scheme's forward alone."""
    scheme, threshold = e.module.scheme, e.module.threshold
    extras = [t.detach() for t in e.extras.values()]
    with torch.no_grad():
        on = scheme.masked_weight(e.weight, torch.full_like(e.mask_real, threshold + 1.0), threshold, extras)
        off = scheme.masked_weight(e.weight, torch.zeros_like(e.mask_real), threshold, extras)
    return on - off


def _reference_grads(model, xs):
    """The straight-through gradient from a plain model: dE/dW' by autograd on the folded
    weights, times W'(m = 1) - W'(m = 0) (eq. 7: times W)."""
    plain = fold_masks(model).eval()
    for p in plain.parameters():
        p.grad = None
    for x in xs:
        _loss(plain(x)).backward()
    return {e.key: (plain.get_submodule(e.key).weight.grad if e.weight_name == "weight"
                    else plain.get_parameter(e.key).grad) * _switch_effect(e).to(e.weight.dtype)
            for e in mask_entries(model)}


def _grads(model):
    return {e.key: e.mask_real.grad for e in mask_entries(model)}


def _assert_eq7(model, xs, grads=None):
    expected = _reference_grads(model, xs)
    got = grads if grads is not None else _grads(model)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] is not None, key
        # fp32 sums: an entry's error follows the size of the gradient, not of the entry (a
        # compiled step and the eager folded network round W' differently)
        scale = float(expected[key].abs().max())
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6 * max(1.0, scale), msg=key)


def _assert_folds(model, x):
    with torch.no_grad():
        torch.testing.assert_close(fold_masks(model).eval()(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def _eager(model, x):
    _loss(model(x)).backward()
    return model, [x], None


def _compile(model, x):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters
    dynamo.reset()
    counters.clear()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    _loss(compiled(x)).backward()
    with torch.no_grad():
        compiled(x + 1)  # a second call with the same shapes must not recompile
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(graphs) <= 2, f"{len(graphs)} graphs: recompiled"  # forward with grad, then under no_grad
    return model, [x], None


def _func_grad(model, x):
    from torch.func import functional_call, grad
    masks = {n: p for n, p in model.named_parameters() if n.endswith("mask_real")}
    others = {n: p for n, p in model.named_parameters() if n not in masks}

    def f(m):
        return _loss(functional_call(model, {**others, **m}, (x,)))

    g = grad(f)(masks)
    by_key = {}
    for e in mask_entries(model):
        name = next(n for n, p in masks.items() if p is e.mask_real)
        by_key[e.key] = g[name]
    return model, [x], by_key


def _checkpointed(model, x):
    _loss(checkpoint(model, x, use_reentrant=False)).backward()
    return model, [x], None


def _pickled(model, x):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded = pickle.loads(pickle.dumps(loaded))
    assert is_piggybacked(loaded)
    _loss(loaded(x)).backward()
    return loaded, [x], None


def _moved(model, x):
    model = model.to(torch.float64)
    x = x.double()
    for module in model.modules():  # nothing weight-sized is cached outside params/buffers
        assert not any(isinstance(v, torch.Tensor) for v in module.__dict__.values())
    _loss(model(x)).backward()
    return model, [x], None


def _two_forwards(model, x):
    x2 = torch.flip(x, dims=[-1])
    y1, y2 = model(x), model(x2)
    (_loss(y1) + _loss(y2)).backward()
    return model, [x, x2], None


def _mode_switch(model, x):
    model.train()
    y = model(x)
    model.eval()
    model.train()
    _loss(y).backward()
    return model.eval(), [x], None


MODES = {"eager": _eager, "compile": _compile, "func_grad": _func_grad, "checkpoint": _checkpointed,
         "pickle": _pickled, "to": _moved, "two_forwards": _two_forwards, "train_eval": _mode_switch}


# binary on every backbone; every other registered scheme on two (a WRN, and timm's convs
# with their own forward)
CASES = [(b, m, "binary") for b in BACKBONES for m in MODES] + \
    [(b, m, s) for s in SCHEMES if s != "binary" for b in ("wrn", "timm_same") for m in MODES]
# the compiled cases beyond one (the WRN, binary) are left out of the fast subset
CASES = [pytest.param(*c, marks=pytest.mark.slow) if c[1] == "compile" and c[:1] + c[2:] != ("wrn", "binary") else c
         for c in CASES]


@pytest.mark.parametrize("backbone,mode,scheme", CASES)
def test_eq7_and_folding(backbone, mode, scheme):
    model, x = _build(backbone, scheme=scheme)
    model, xs, grads = MODES[mode](model, x)
    _assert_eq7(model, xs, grads)
    _assert_folds(model, xs[0])
    assert all(e.weight.grad is None for e in mask_entries(model))  # the backbone gets no gradient
    if mode not in ("func_grad",):  # scheme extras train: each got a gradient
        assert all(t.grad is not None for e in mask_entries(model) for t in e.extras.values())


def test_inductor_compiled_training_matches_eager():
    """The real compiler (not only the tracer) on one small masked network."""
    model, x = _build("wrn")
    twin = copy.deepcopy(model)
    compiled = torch.compile(model)
    out = compiled(x)
    _loss(out).backward()
    ref = twin(x)
    _loss(ref).backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(mask_entries(model), mask_entries(twin)):
        torch.testing.assert_close(a.mask_real.grad, b.mask_real.grad, rtol=1e-4, atol=1e-6)


def _relative_error(got, expected):
    return float((got.double() - expected.double()).norm() / expected.double().norm())


def test_bf16_channels_last_keeps_eq7_eager_and_compiled():
    """``--amp on --channels-last on`` (bf16 autocast, channels_last), eager and under the
    real compiler: the forward is the fp32 one up to bf16 rounding, and the mask gradients
    stay eq. 7's up to it (a few percent of their norm here; a gradient missing the factor
    W or the binarized mask would be off by its whole size)."""
    from common.amp import autocast, maybe_channels_last
    model, x = _build("wrn")
    model, x = maybe_channels_last(model, True), maybe_channels_last(x, True)
    expected = _reference_grads(model, [x])  # fp32
    with torch.no_grad():
        fp32_out = model(x)
    twin = copy.deepcopy(model)
    with autocast("cpu", True):
        eager_out = twin(x)
    _loss(eager_out.float()).backward()
    compiled = torch.compile(model)
    with autocast("cpu", True):
        out = compiled(x)
    _loss(out.float()).backward()
    assert eager_out.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert _relative_error(eager_out.detach(), fp32_out) < 1e-2
    assert _relative_error(out.detach(), eager_out.detach()) < 1e-2
    for a, b in zip(mask_entries(model), mask_entries(twin)):
        assert _relative_error(b.mask_real.grad, expected[b.key]) < 0.15, b.key  # eager
        assert _relative_error(a.mask_real.grad, expected[a.key]) < 0.15, a.key  # compiled
        assert a.weight.grad is None and b.weight.grad is None
