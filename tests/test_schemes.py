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
    from classification.models import pretrained_model
    model, _ = pretrained_model("test_resnet", 2, tmp_path / "w.safetensors")
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


@pytest.mark.parametrize("path", ["cpu-eager", "select", "compiled"])
@pytest.mark.parametrize("name", ["affine", "affine-channel"])
@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (6, 1, 1, 1), (5, 4), (5, 1)],
                         ids=["conv", "1x1-depthwise", "linear", "linear-one-input"])
def test_affine_gradients_match_an_independent_computation(name, shape, path, monkeypatch):
    # every way of writing W' and its gradients: products with a float mask (CPU eager), the
    # select that GPUs use, and the traced form of compiled steps (one stacked reduction for
    # the scalars' gradients)
    import common.kernels
    if path == "select":
        monkeypatch.setattr(common.kernels, "cpu_eager", lambda *tensors: False)
    torch.manual_seed(0)
    weight = torch.randn(*shape, dtype=torch.float64)
    mask_real = (torch.rand(weight.shape, dtype=torch.float64) * 0.02 - 0.005).requires_grad_()
    scheme = get_scheme(name)
    (abcd,) = scheme.init_extras(weight).values()  # one tensor per layer, rows a, b, c, d
    assert abcd.shape[0] == 4 and abcd.shape[1:] == scheme.extras_shape(weight.shape)[1:]
    extras = [(abcd.double() + 0.3 * torch.randn(abcd.shape, dtype=torch.float64)).requires_grad_()]
    upstream = torch.randn(weight.shape, dtype=torch.float64)
    masked = scheme.masked_weight
    if path == "compiled":
        torch._dynamo.reset()
        masked = torch.compile(scheme.masked_weight, backend="eager", fullgraph=True)
    out = masked(weight, mask_real, 5e-3, extras)
    if path != "compiled":  # the form the path names is the one that ran
        form = "AffineMaskedWeightCPU" if path == "cpu-eager" else "AffineMaskedWeightBackward"
        assert type(out.grad_fn).__name__.startswith(form)
    (out * upstream).sum().backward()
    m = (mask_real.detach() >= 5e-3).double()
    rows = [t.detach().clone().requires_grad_() for t in extras[0].unbind(0)]  # a, b, c, d apart
    ref = _affine_reference(weight, m, *rows)
    torch.testing.assert_close(out.detach(), ref.detach())
    (ref * upstream).sum().backward()
    assert extras[0].grad.shape == extras[0].shape
    for got, want in zip(extras[0].grad.unbind(0), rows):
        torch.testing.assert_close(got, want.grad)
    a, b, c, d = extras[0].detach().unbind(0)
    # eq. 7 on W': dE/dW' times what switching the entry on changes, b W + c
    torch.testing.assert_close(mask_real.grad, upstream * (b * weight + c))


@pytest.mark.parametrize("path", ["cpu-eager", "select"])
@pytest.mark.parametrize("name", ["affine", "affine-channel"])
def test_affine_retained_graphs_and_higher_order_gradients(name, path, monkeypatch):
    # the CPU form hands its float mask from the forward to the first backward: a second
    # backward through a retained graph must give the same gradients, and a graph of the
    # gradients (create_graph) must carry a, b, c, d as values with gradients of their own
    import common.kernels
    if path == "select":
        monkeypatch.setattr(common.kernels, "cpu_eager", lambda *tensors: False)
    torch.manual_seed(1)
    scheme = get_scheme(name)
    weight = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    mask_real = (torch.rand(weight.shape, dtype=torch.float64) * 0.02 - 0.005).requires_grad_()
    (abcd,) = scheme.init_extras(weight).values()
    abcd = (abcd.double() + 0.3 * torch.randn(abcd.shape, dtype=torch.float64)).requires_grad_()
    upstream, probe = torch.randn(weight.shape, dtype=torch.float64), torch.randn(weight.shape, dtype=torch.float64)
    loss = (scheme.masked_weight(weight, mask_real, 5e-3, [abcd]) * upstream).sum()
    first = torch.autograd.grad(loss, [mask_real, abcd], retain_graph=True)
    second = torch.autograd.grad(loss, [mask_real, abcd], retain_graph=True)
    for f, s in zip(first, second):
        torch.testing.assert_close(f, s, rtol=0, atol=0)
    # second order: d/d(abcd) of sum(dE/d(mask_real) * probe), with dE/d(mask_real) = upstream * (b W + c)
    mask_grad, _ = torch.autograd.grad(loss, [mask_real, abcd], create_graph=True)
    (got,) = torch.autograd.grad((mask_grad * probe).sum(), abcd)
    rows = [t.detach().clone().requires_grad_() for t in abcd.unbind(0)]
    (upstream * (rows[1] * weight + rows[2]) * probe).sum().backward()
    want = torch.stack([torch.zeros_like(rows[0]) if r.grad is None else r.grad for r in rows])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(mask_grad.detach(), first[0])


def test_affine_storage_is_about_one_bit_per_weight(tmp_path):
    from decathlon.accounting import mask_file_cost
    from decathlon.networks import create_model
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
    flat = " ".join(text.split())  # the lines are wrapped to the terminal
    for name, scheme in SCHEMES.items():
        assert f" {name}: {scheme.summary}; stores {scheme.cost}" in flat
    assert "4 floats per layer" in flat and "4 floats per output channel" in flat
    assert "measured" not in text.split("mask schemes")[1].split("\n", 1)[1]  # figures live in BENCHMARKS.md


@pytest.mark.parametrize("name,weight_decay", [("sgd", 5e-4), ("adam", 1e-2), ("adamw", 1e-2)])
def test_flat_group_equals_one_group_per_learning_rate(name, weight_decay):
    """flat_group: the tensors optimised as one flat tensor, each step scaled per tensor,
    end where the optimizer takes them with one group per learning rate, weight decay and
    momentum included; their gradients are cleared by the step."""
    from common.optimizers import flat_group, make_optimizer
    torch.manual_seed(0)
    start = [torch.randn(3, 1), torch.randn(1), torch.randn(2, 2)]
    scales = [1.0, 0.05, 3.0]
    ours = [t.clone().requires_grad_(True) for t in start]
    ref = [t.clone().requires_grad_(True) for t in start]
    opt = flat_group(name, ours, lr=1e-2, scales=scales, weight_decay=weight_decay)
    groups = make_optimizer(name, [{"params": [p], "lr": 1e-2 * s} for p, s in zip(ref, scales)], lr=1e-2,
                            weight_decay=weight_decay)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 1
    for _ in range(5):
        for a, b in zip(ours, ref):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        groups.step()
        assert all(p.grad is None for p in ours)
    for a, b, s0 in zip(ours, ref, start):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
        assert not torch.equal(a, s0)


def test_flat_group_resumes_from_its_state_and_keeps_tensors_without_gradients():
    """A flat group's state dict restores the same trajectory in a fresh group over other
    tensors of the same shapes (a resumed run), values changed outside the optimizer are
    picked up, and a tensor without a gradient keeps its value."""
    from common.optimizers import flat_group
    torch.manual_seed(0)
    shapes = [(2, 1), (1,), (4,)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(6)]

    def run(params, opt, steps):
        for g in steps:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()

    a = [torch.ones(s, requires_grad=True) for s in shapes]
    opt_a = flat_group("adam", a, lr=1e-2, scales=[1.0, 0.5, 2.0])
    run(a, opt_a, grads)
    b = [torch.ones(s, requires_grad=True) for s in shapes]
    opt_b = flat_group("adam", b, lr=1e-2, scales=[1.0, 0.5, 2.0])
    run(b, opt_b, grads[:3])
    saved = opt_b.state_dict()
    c = [p.detach().clone().requires_grad_(True) for p in b]
    opt_c = flat_group("adam", c, lr=1e-2, scales=[1.0, 0.5, 2.0])
    opt_c.load_state_dict(saved)
    run(c, opt_c, grads[3:])
    for x, y in zip(a, c):
        torch.testing.assert_close(x, y)
    with torch.no_grad():
        c[2].fill_(5.0)  # set from outside, e.g. a loaded mask file
    kept = c[1].detach().clone()
    c[0].grad, c[2].grad = torch.zeros(2, 1), torch.zeros(4)
    opt_c.step()
    assert torch.equal(c[1], kept) and c[1].grad is None
    assert torch.allclose(c[2], torch.full((4,), 5.0), atol=0.1)


def test_flat_group_over_mixed_dtypes_uses_one_group_per_tensor():
    from common.optimizers import flat_group
    params = [torch.zeros(2, requires_grad=True), torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    opt = flat_group("sgd", params, lr=0.1, scales=[1.0, 2.0], momentum=0.0)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose(params[0], torch.full((2,), -0.1)) and torch.allclose(params[1], torch.full((3,), -0.2, dtype=torch.float64))


def test_flat_group_scales_per_row_and_refuses_what_it_cannot_scale():
    from common.errors import UsageError
    from common.optimizers import flat_group
    params = [torch.zeros(3, 2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    opt = flat_group("sgd", params, lr=0.1, scales=[(1.0, 2.0, 3.0), 0.5], momentum=0.0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    want = -0.1 * torch.tensor([1.0, 2.0, 3.0]).view(3, 1).expand(3, 2)
    assert torch.allclose(params[0], want) and torch.allclose(params[1], torch.full((2,), -0.05))
    with pytest.raises(ValueError, match="2 learning-rate scales for a tensor of shape \\(3, 2\\)"):
        flat_group("sgd", [torch.zeros(3, 2, requires_grad=True)], lr=0.1, scales=[(1.0, 2.0)])
    mixed = [torch.zeros(2, 2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)]
    with pytest.raises(UsageError, match="scales per row need every parameter on one device and in one dtype"):
        flat_group("sgd", mixed, lr=0.1, scales=[(1.0, 2.0), 1.0])


def test_affine_shifts_learn_in_units_of_their_layers_weights():
    """c and d are added to the weight: their learning rate is the extras' rate times the
    RMS of the layer's frozen weight; a and b (factors) take the rate itself."""
    import torch.nn as nn
    from types import SimpleNamespace
    from common.masking import mask_entries
    from common.methods import MaskSettings, get_method
    from common.optimizers import build_optimizers
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.mul_(10)  # a layer at ten times the other's scale
    prepared = get_method("piggyback").prepare(model, head=("4",), masks=MaskSettings(scheme="affine"),
                                               train_bn=False)
    cfg = SimpleNamespace(optimizer="adam", lr=1e-4, weight_decay=0.0, head_optimizer="adam", head_lr=1e-3,
                          head_weight_decay=0.0, extras_optimizer="adam", extras_lr=1e-3, momentum=0.9)
    built = build_optimizers(prepared, cfg)
    extras = built["extras"]
    assert len(extras.param_groups) == 1  # one group: the per-layer rates scale its steps
    # the reference: plain Adam with one group per parameter at the rate it should get
    entries = mask_entries(model)
    # one tensor per layer whose rows a, b, c, d each get their own rate: the reference holds
    # each row as its own tensor
    rms = {id(e.extras["abcd"]): float(e.weight.pow(2).mean().sqrt()) for e in entries}
    assert [id(p) for p in prepared.extras] == list(rms)
    rows = {(id(p), r): p.detach()[r].clone().requires_grad_(True) for p in prepared.extras for r in range(4)}
    rate = {(i, r): 1e-3 * (rms[i] if r >= 2 else 1.0) for (i, r) in rows}
    reference = torch.optim.Adam([{"params": [t], "lr": rate[k]} for k, t in rows.items()])
    schedulers = [torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2], gamma=0.1) for o in (extras, reference)]
    for step in range(4):
        for p in prepared.extras:
            p.grad = torch.randn_like(p) * (step + 1)
            for r in range(4):
                rows[(id(p), r)].grad = p.grad[r].clone()
        extras.step()
        reference.step()
        for s in schedulers:
            s.step()
    for p in prepared.extras:
        for r in range(4):
            assert torch.allclose(p.detach()[r], rows[(id(p), r)], rtol=1e-5, atol=1e-9), (p, r)
    moved = [max(abs(float(p.detach()[r].sum()) - (1.0 if r == 1 else 0.0)) for p in prepared.extras)
             for r in range(4)]
    ratios = list(rms.values())
    assert max(ratios) / min(ratios) > 3 and all(v > 0 for v in moved)
