"""The common training engine: no host reads per step, the device-side non-finite guard,
collapse detection, resume (every setting compared, log rewritten, leftovers removed,
bit-identical continuation), run-folder hygiene, the optimizer table and the full-weight
file."""
from __future__ import annotations

import json
from types import SimpleNamespace
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from common.amp import Precision
from common.checkpoint import load_training_checkpoint
from common.classify import ClassificationPipeline
from common.collapse import CollapseMonitor
from common.distributed import DistInfo, make_sampler
from common.engine import FitState, StepOutput, _Accumulator, fit, train_one_epoch
from common.errors import DataError, DivergedError, PiggybackError, ResumeError, UsageError, WeightsFileError
from common.methods import METHODS, MaskSettings
from common.optimizers import OPTIMIZERS, build_optimizers, make_optimizer
from common.runlog import RunDir
from common.weightsfile import load_weights_file, read_weights_file, save_weights_file

CPU = Precision(torch.device("cpu"))
ONE = DistInfo()


def _data(n=24, classes=3, seed=0, bad_batch=None, batch=4):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, classes, (n,), generator=g)
    if bad_batch is not None:
        x[bad_batch * batch] = float("nan")
    return TensorDataset(x, y)


def _mlp(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, classes))


def _loaders(data, seed=0, batch=4):
    sampler = make_sampler(data, None, shuffle=True, seed=seed)
    return DataLoader(data, batch_size=batch, sampler=sampler), DataLoader(data, batch_size=8)


def _fit(out, epochs, *, config=None, model=None, pipeline=None, data=None, perturb=False, print_freq=100,
         may_change=()):
    data = data or _data()
    model = model or _mlp()
    train, val = _loaders(data)
    opt = {"main": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)}
    sched = {"main": torch.optim.lr_scheduler.StepLR(opt["main"], 1, gamma=0.5)}
    if perturb:  # a new process starts from other RNG states
        torch.manual_seed(1234)
    else:
        torch.manual_seed(7)
    result = fit(RunDir(out), FitState(model, opt, sched), pipeline or ClassificationPipeline(CPU, val, 3),
                 train, epochs=epochs, config=config or {"lr": 0.1, "epochs": epochs}, dist=ONE,
                 set_epoch=train.sampler.set_epoch, print_freq=print_freq, log=lambda *_: None,
                 may_change=may_change)
    return model, result


# ----------------------------------------------------------------- host reads per step

TORCH_DIR = str(Path(torch.__file__).resolve().parent)


def _count_host_reads(monkeypatch):
    """Calls that read a tensor on the host, made from any code but torch's own (the
    optimizers read their CPU-side step counters, which is no device synchronisation)."""
    calls = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not caller.startswith(TORCH_DIR):
                calls.append(f"{_name} at {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("masked", [False, True])
def test_no_host_read_per_training_step(monkeypatch, masked):
    def epoch_reads(steps):
        model = _mlp()
        prepared = METHODS["piggyback" if masked else "finetune"].prepare(model, head=("3",))
        opt = build_optimizers(prepared, SimpleNamespace(optimizer="adam", lr=1e-3, weight_decay=0,
                                                         head_optimizer="adam", head_lr=1e-3, head_weight_decay=0))
        loader = DataLoader(_data(n=4 * steps), batch_size=4)
        calls = _count_host_reads(monkeypatch)
        stats = train_one_epoch(model, loader, ClassificationPipeline(CPU, None, 3), opt, device=CPU.device,
                                epoch=1, print_freq=1000, is_main=False)
        monkeypatch.undo()
        assert stats["steps"] == steps
        return list(calls)

    few, many = epoch_reads(3), epoch_reads(12)
    # One read at the first step's window and one at the epoch's end, however many steps.
    assert len(few) == len(many) <= 2, many


def test_engine_bookkeeping_is_one_device_copy_per_recorded_value():
    """Per step the engine adds to the model's own work only a copy of the loss and of each
    count into its epoch buffers (a GPU run at batch 32 is bound by such host work)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket not in (torch.ops.aten.select, torch.ops.aten.detach, torch.ops.aten.alias):
                self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    acc = _Accumulator(CPU.device, steps=4)
    losses = [0.5, 1.5, float("inf"), 2.0, float("nan")]  # one step past the buffer: it grows
    for i, loss in enumerate(losses):
        out = StepOutput(loss=torch.tensor(loss), count=2 + i,
                         sums={"correct": torch.tensor(float(i)), "other": torch.tensor(1.0)})
        with Count() as mode:
            acc.add(out)
        if 0 < i < 4:  # (the first step allocates the count buffers)
            assert mode.ops == ["aten.copy_"] * 3, mode.ops
    now = acc.read()
    assert now["count"] == sum(range(2, 7)) and now["sums"] == {"correct": 10.0, "other": 5.0}
    assert now["first_bad"] == 2 and now["bad_here"] and now["bad_value"] == float("inf")
    acc = _Accumulator(CPU.device, steps=3)
    for i, loss in enumerate([0.5, 1.5]):
        acc.add(StepOutput(loss=torch.tensor(loss), count=4))
    now = acc.read()
    assert (now["loss_sum"], now["sums"], now["count"], now["first_bad"]) == (8.0, {}, 8.0, None)


def test_a_loader_longer_than_its_len_is_recorded_whole():
    class Longer(list):
        def __len__(self):
            return 2

    data = _data(n=24)
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    batches = Longer([(data.tensors[0][i:i + 4], data.tensors[1][i:i + 4]) for i in range(0, 24, 4)])
    stats = train_one_epoch(model, batches, ClassificationPipeline(CPU, None, 3),
                            {"main": torch.optim.SGD(model.parameters(), lr=0.0)}, device=CPU.device, epoch=1,
                            print_freq=1000, is_main=False)
    model.eval()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(data.tensors[0]), data.tensors[1]).item()
    assert stats["steps"] == 6 and stats["train_loss"] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------- non-finite guard

def test_non_finite_loss_names_the_first_bad_step_read_later():
    model = _mlp()
    loader = DataLoader(_data(n=32, bad_batch=5), batch_size=4)  # batch 5 holds a NaN input
    opt = {"main": torch.optim.SGD(model.parameters(), lr=0.1)}
    with pytest.raises(DivergedError, match=r"non-finite loss nan at epoch 2 step 5;") as err:
        # read at step 0 and at the end (step 7) only: the device remembered step 5
        train_one_epoch(model, loader, ClassificationPipeline(CPU, None, 3), opt, device=CPU.device,
                        epoch=2, print_freq=100, is_main=False)
    assert isinstance(err.value, FloatingPointError) and isinstance(err.value, PiggybackError)


# ----------------------------------------------------------------- collapse

def test_collapse_monitor_loss_jump_and_accuracy_fall():
    mon = CollapseMonitor(chance=0.1)
    losses = [2.3, 1.5, 1.0, 0.7, 0.6, 0.55, 0.5]
    for i, loss in enumerate(losses):
        assert mon.update(loss=loss, steps=10, step=10 * i + 9, epoch=1, accuracy=0.2 + 0.1 * i, examples=640) is None
    event = None
    for i, loss in enumerate([2.3, 2.3, 2.3], start=len(losses)):
        event = event or mon.update(loss=loss, steps=10, step=10 * i + 9, epoch=2, accuracy=0.1, examples=640)
    assert event is not None and event["step"] == 79 and event["epoch"] == 2 and "loss" in event["reason"]
    assert mon.update(loss=5.0, steps=10, step=200, epoch=3) is None  # reported once
    restored = CollapseMonitor(chance=0.1)
    restored.load_state_dict(mon.state_dict())
    assert restored.event == event

    acc = CollapseMonitor(chance=0.1, loss_ratio=100)  # loss rule out of the way
    for i in range(6):
        acc.update(loss=1.0, steps=10, step=i, epoch=1, accuracy=0.6, examples=640)
    falls = [acc.update(loss=1.0, steps=10, step=10 + i, epoch=1, accuracy=0.05, examples=640) for i in range(4)]
    assert any(e and "accuracy fell" in e["reason"] for e in falls)
    noisy = CollapseMonitor(chance=0.1, loss_ratio=100)
    for i in range(10):  # tiny windows: too few examples to judge accuracy
        assert noisy.update(loss=1.0, steps=1, step=i, epoch=1, accuracy=float(i % 2), examples=4) is None


def test_collapse_monitor_catches_an_early_collapse_worse_than_guessing():
    """The paper recipe on MNIST: loss 2.2 (barely below ln 10 = 2.30, accuracy ~15 %), then the
    masks switch off together and the loss climbs to 2.7 while accuracy sinks to 10 %."""
    mon = CollapseMonitor(chance=0.1)
    seen = [mon.update(loss=loss, steps=10, step=10 * i + 9, epoch=1, accuracy=acc, examples=320)
            for i, (loss, acc) in enumerate([(2.45, 0.1), (2.3, 0.12), (2.2, 0.15), (2.2, 0.15), (2.5, 0.11),
                                             (2.7, 0.1), (2.7, 0.1), (2.7, 0.1)])]
    event = next(e for e in seen if e)
    assert "uniform guess" in event["reason"] and event["step"] in (59, 69)
    calm = CollapseMonitor(chance=0.1)  # a new head starting above ln 10, then learning: no collapse
    for i, loss in enumerate([2.9, 2.6, 2.4, 2.1, 1.8, 1.5, 1.3]):
        assert calm.update(loss=loss, steps=10, step=i, epoch=1, accuracy=0.1 + 0.1 * i, examples=320) is None


def test_collapse_monitor_names_a_loss_that_grows_by_orders_of_magnitude():
    """--lr 1e6: the loss is 1e9 from the second window on; there is no minimum to rise from."""
    mon = CollapseMonitor(chance=0.1)
    assert mon.update(loss=2.4, steps=1, step=0, epoch=1) is None
    event = mon.update(loss=1.1e9, steps=10, step=10, epoch=1)
    assert event is not None and event["step"] == 10 and "orders of magnitude" in event["reason"]
    assert "the first window's 2.4000" in event["reason"]  # ln 10 = 2.30 < 2.4: the first window is the reference
    guess = CollapseMonitor(chance=0.1)
    guess.update(loss=1.0, steps=1, step=0, epoch=1)
    assert "the uniform guess's 2.3026" in guess.update(loss=1e3, steps=10, step=10, epoch=1)["reason"]
    first = CollapseMonitor(chance=None)  # no chance (a regression-like loss): the first window's loss
    first.update(loss=3.0, steps=1, step=0, epoch=1)
    assert first.update(loss=250.0, steps=10, step=10, epoch=1) is None  # 83x: not yet
    assert "first window's 3.0000" in first.update(loss=400.0, steps=10, step=20, epoch=1)["reason"]
    small = CollapseMonitor(chance=None)  # tiny losses that grow 200x but by less than the margin
    small.update(loss=0.001, steps=1, step=0, epoch=1)
    assert small.update(loss=0.2, steps=10, step=10, epoch=1) is None
    below_guess = CollapseMonitor(chance=0.1)  # a good start far below ln 10 is no reference
    below_guess.update(loss=0.01, steps=1, step=0, epoch=1)
    assert below_guess.update(loss=2.0, steps=10, step=10, epoch=1) is None
    restored = CollapseMonitor(chance=None)
    restored.load_state_dict(first.state_dict())
    assert restored.first_loss == 3.0


def test_fit_reports_a_learning_rate_far_too_high_as_a_collapse(tmp_path):
    """SGD at 30 on the MLP: the loss climbs to hundreds within a few steps and stays finite."""
    data = _data(n=48)
    model = _mlp()
    train, val = _loaders(data)
    opt = {"main": torch.optim.SGD(model.parameters(), lr=30.0)}
    result = fit(RunDir(tmp_path / "r"), FitState(model, opt), ClassificationPipeline(CPU, val, 3), train,
                 epochs=1, config={"lr": 30.0}, dist=ONE, set_epoch=train.sampler.set_epoch, print_freq=2,
                 log=lambda *_: None)
    assert result.collapse is not None and "orders of magnitude" in result.collapse["reason"], result.history
    assert result.record["collapse"]["step"] == result.collapse["step"] >= 1
    assert json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[-1])["collapse"] == result.collapse


def test_collapse_monitor_names_a_run_that_never_leaves_chance():
    """Affine scalars at a rate far too high: loss ln 10 and accuracy 10 % from the first epoch on."""
    mon = CollapseMonitor(chance=0.1)
    events = [mon.update(loss=2.3026, steps=10, step=10 * i + 9, epoch=1 + i // 4, accuracy=0.1, examples=320)
              for i in range(16)]
    first = next(i for i, e in enumerate(events) if e)
    assert first == 8 and "never rose above" in events[first]["reason"]  # the first window of epoch 3
    learning = CollapseMonitor(chance=0.1)  # slow but learning: 20 % by epoch 2 is more than 1.5x chance
    for i in range(16):
        assert learning.update(loss=2.2, steps=10, step=i, epoch=1 + i // 4, accuracy=0.12 + 0.01 * i,
                               examples=320) is None


class _Collapsing(ClassificationPipeline):
    """Learns, then from the 61st step on (epoch 4) something breaks: the network's
    output is scrambled (as when a mask switches a layer off)."""

    def __init__(self, val):
        super().__init__(CPU, val, 3)
        self.calls = 0

    def train_step(self, model, batch):
        self.calls += 1
        if self.calls > 60:
            images, targets = batch
            batch = images, (targets + 1) % 3
        return super().train_step(model, batch)


def test_collapse_reported_in_log_line_log_and_result(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=g)
    data = TensorDataset(4 * x, x[:, :3].argmax(dim=1))  # easily learnt
    model = _mlp()
    train, val = _loaders(data, batch=4)
    lines = []
    opt = {"main": torch.optim.Adam(model.parameters(), lr=1e-2)}
    result = fit(RunDir(tmp_path / "run"), FitState(model, opt), _Collapsing(val), train, epochs=5,
                 config={}, dist=ONE, set_epoch=train.sampler.set_epoch, print_freq=5, log=lines.append)
    history = [r["train_loss"] for r in result.history]
    assert history[3] > 2 * history[2], history
    assert result.collapse is not None and result.collapse["epoch"] == 4, result.collapse
    assert 60 <= result.collapse["step"] < 80
    log = RunDir(tmp_path / "run").read_log()
    assert [r["epoch"] for r in log if "collapse" in r] == [4]
    assert any("COLLAPSE at step" in line for line in lines)


# ----------------------------------------------------------------- resume

def test_resume_continues_bit_identically_and_rewrites_the_log(tmp_path):
    full, ref = _fit(tmp_path / "full", 3)
    _fit(tmp_path / "split", 1)
    folder = tmp_path / "split"
    # A kill during a write: leftovers, and a log that ran ahead of the checkpoint.
    (folder / ".checkpoint.pt.k2j3h4_x.tmp").write_bytes(b"partial")
    (folder / ".log.jsonl.abcdefgh.tmp").write_bytes(b"partial")
    with open(folder / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 1, "train_loss": 9.9}) + "\n" + json.dumps({"epoch": 2}) + "\n")
    (folder / "notes.txt").write_text("a user's file stays")
    resumed, res = _fit(folder, 3, perturb=True)
    assert res.start_epoch == 1 and [r["epoch"] for r in res.history] == [1, 2, 3]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["train_loss"] for r in res.history] == [r["train_loss"] for r in ref.history]
    assert RunDir(folder).read_log() == res.history  # exactly the checkpoint's epochs, once each
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl", "notes.txt"]
    ckpt = load_training_checkpoint(folder / "checkpoint.pt")
    assert ckpt["epoch"] == 3 and len(ckpt["rng"]) == 1 and ckpt["history"] == res.history


def test_resume_compares_every_setting_but_the_allowed_ones(tmp_path):
    config = {"lr": 0.1, "new_flag": "a", "workers": 2, "print_freq": 5, "device": "cpu", "out": "/x",
              "data_root": "/d", "cache_dir": None, "compile": "auto", "epochs": 2}
    _fit(tmp_path / "r", 2, config=config)
    with pytest.raises(ResumeError, match="other settings.*new_flag: 'a' there, 'b' now"):
        _fit(tmp_path / "r", 2, config=dict(config, new_flag="b"))
    with pytest.raises(ResumeError, match="extra"):
        _fit(tmp_path / "r", 2, config=dict(config, extra=1))  # a key the checkpoint lacks
    with pytest.raises(ResumeError, match="holds 2 epochs; --epochs 1 is fewer"):
        _fit(tmp_path / "r", 1, config=dict(config, epochs=1))
    moved = dict(config, workers=0, print_freq=9, device="cuda", out="/y", data_root="/e", cache_dir="/c",
                 compile="on", epochs=3)
    with pytest.raises(ResumeError, match="workers"):  # only what the configuration declares free may change
        _fit(tmp_path / "r", 3, config=moved)
    _, res = _fit(tmp_path / "r", 3, config=moved,
                  may_change=("workers", "print_freq", "device", "out", "data_root", "cache_dir", "compile"))
    assert res.start_epoch == 2 and len(res.history) == 3
    assert json.loads((tmp_path / "r" / "config.json").read_text())["workers"] == 0


class _Failing(ClassificationPipeline):
    def train_step(self, model, batch):
        raise DataError("a corrupt image")


def test_a_run_failing_before_its_first_checkpoint_leaves_no_folder(tmp_path):
    data = _data()
    train, val = _loaders(data)
    with pytest.raises(DataError):
        _fit(tmp_path / "new", 2, pipeline=_Failing(CPU, val, 3))
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # a folder that was there before is never removed
    with pytest.raises(DataError):
        _fit(tmp_path / "mine", 2, pipeline=_Failing(CPU, val, 3))
    assert (tmp_path / "mine").is_dir()
    # A refused resume writes nothing.
    _fit(tmp_path / "done", 1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()}
    with pytest.raises(ResumeError):
        _fit(tmp_path / "done", 2, config={"lr": 0.5})
    assert {p.name: p.read_bytes() for p in (tmp_path / "done").iterdir()} == before


# ----------------------------------------------------------------- registry, optimizers, weights files

def test_one_optimizer_table_with_one_signature():
    params = [nn.Parameter(torch.zeros(2))]
    assert set(OPTIMIZERS) == {"sgd", "adam", "adamw"}
    sgd = make_optimizer("sgd", params, lr=0.1, weight_decay=1e-4, momentum=0.99)
    assert sgd.param_groups[0]["momentum"] == 0.99 and sgd.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(make_optimizer("adamw", params, lr=0.1), torch.optim.AdamW)
    with pytest.raises(UsageError, match="unknown optimizer 'rmsprop'; valid: sgd, adam, adamw"):
        make_optimizer("rmsprop", params, lr=0.1)


def test_methods_split_head_and_train_bn_modifier():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))

    model = net()
    model(torch.randn(1, 3, 5, 5))
    p = METHODS["feature"].prepare(model, head=("3",), train_bn=False)
    assert p.main == [] and len(p.head) == 2 and p.frozen_modules == [model[1]]
    model = net()
    model(torch.randn(1, 3, 5, 5))
    p = METHODS["feature"].prepare(model, head=("3",), train_bn=True)
    assert len(p.head) == 4 and p.frozen_modules == []
    with pytest.raises(UsageError, match="already train"):
        METHODS["finetune"].prepare(net(), head=("3",), train_bn=True)
    model = net()
    model(torch.randn(1, 3, 5, 5))
    p = METHODS["piggyback"].prepare(model, head=("3",), masks=MaskSettings(mask_init="constant"), train_bn=True)
    assert len(p.main) == 1 and {id(q) for q in p.head} == {id(q) for q in (*model[1].parameters(), *model[3].parameters())}


def test_weights_file_round_trip_and_refusals(tmp_path):
    model = nn.Linear(3, 2)
    path = save_weights_file(tmp_path / "w.safetensors", model, format="test-weights", task="t", epochs=2)
    tensors, meta = read_weights_file(path, "test-weights")
    assert meta == {"task": "t", "epochs": 2} and torch.equal(tensors["weight"], model.weight)
    other = nn.Linear(3, 2)
    assert load_weights_file(other, path, "test-weights")["task"] == "t"
    assert torch.equal(other.weight, model.weight)
    with pytest.raises(WeightsFileError, match="not a other-weights file"):
        read_weights_file(path, "other-weights")
    with pytest.raises(WeightsFileError, match="does not fit"):
        load_weights_file(nn.Linear(3, 3), path)
    from safetensors.torch import save_file  # files written before the common writer
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"user": json.dumps({"method": "finetune"})})
    assert read_weights_file(tmp_path / "old.safetensors", "test-weights")[1] == {"method": "finetune"}
    with pytest.raises(FileNotFoundError):
        read_weights_file(tmp_path / "missing.safetensors")


def _fit_affine(out, epochs, perturb=False):
    """An MLP with affine masks, optimised as the training commands do (masks, head and the
    scalars as one flat tensor at their per-layer rates), through the engine."""
    model = _mlp()
    prepared = METHODS["piggyback"].prepare(model, head=("3",), masks=MaskSettings(scheme="affine"))
    cfg = SimpleNamespace(optimizer="adam", lr=1e-3, weight_decay=0.0, head_optimizer="adam", head_lr=1e-2,
                          head_weight_decay=0.0, extras_optimizer="adam", extras_lr=1e-2, momentum=0.9)
    opt = build_optimizers(prepared, cfg)
    sched = {k: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for k, o in opt.items()}
    train, val = _loaders(_data())
    torch.manual_seed(1234 if perturb else 7)
    fit(RunDir(out), FitState(model, opt, sched), ClassificationPipeline(CPU, val, 3), train, epochs=epochs,
        config={"epochs": epochs, "scheme": "affine"}, dist=ONE, set_epoch=train.sampler.set_epoch,
        print_freq=100, log=lambda *_: None)
    return model


def test_affine_run_resumes_bit_identically(tmp_path):
    """The affine scalars' flat optimizer state travels in the checkpoint: a run stopped
    after one epoch and resumed ends where an uninterrupted run ends, scalars included."""
    full = _fit_affine(tmp_path / "full", 3)
    _fit_affine(tmp_path / "split", 1)
    resumed = _fit_affine(tmp_path / "split", 3, perturb=True)
    names = [n for n, _ in full.named_parameters() if n.endswith("mask_abcd")]
    assert len(names) == 1  # the masked first layer's scalars, one tensor (the head is not masked)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    abcd = dict(full.named_parameters())[names[0]].detach()
    for row, start in zip(abcd.unbind(0), (0.0, 1.0, 0.0, 0.0)):  # a, b, c, d each moved
        assert not torch.equal(row, torch.full_like(row, start))


@pytest.mark.parametrize("when,where", [("epoch 1/3", "after epoch 1"), ("epoch 2/3", "after epoch 2")])
def test_an_interrupt_between_epochs_says_which_epoch_the_checkpoint_holds(tmp_path, when, where):
    """Ctrl-C outside the training steps (here while an epoch's line is printed, after its
    checkpoint) carries no message of its own; the run says where it stopped."""
    def log(line):
        if when in line and "ETA" in line:  # the epoch's summary, printed after its checkpoint
            raise KeyboardInterrupt()

    model = _mlp()
    prepared = METHODS["piggyback"].prepare(model, head=("3",), masks=MaskSettings())
    cfg = SimpleNamespace(optimizer="adam", lr=1e-3, weight_decay=0.0, head_optimizer="adam", head_lr=1e-2,
                          head_weight_decay=0.0, momentum=0.9)
    train, val = _loaders(_data())
    with pytest.raises(KeyboardInterrupt) as info:
        fit(RunDir(tmp_path / "run"), FitState(model, build_optimizers(prepared, cfg), {}),
            ClassificationPipeline(CPU, val, 3), train, epochs=3, config={"epochs": 3}, dist=ONE,
            set_epoch=train.sampler.set_epoch, print_freq=100, log=log)
    n = where.split()[-1]
    assert str(info.value) == f"{where}; the checkpoint holds epoch {n}: re-run the same command to resume"
