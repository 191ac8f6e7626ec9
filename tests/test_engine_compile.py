"""torch.compile in the engine: a compiled piggyback run gives the eager run's losses, and
nothing is compiled again after the first epoch (training and evaluation graphs are made
once per model)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from common.amp import Precision
from common.classify import ClassificationPipeline
from common.distributed import DistInfo, make_sampler
from common.engine import EVAL_COMPILE_MODES, FitState, compile_for_eval, compile_model, fit
from types import SimpleNamespace

from common.heads import reset_classifier
from common.methods import METHODS, MaskSettings
from common.optimizers import build_optimizers
from common.runlog import RunDir
from decathlon.networks import create_model

CPU = Precision(torch.device("cpu"))


def _run(out, compiled: bool, epochs: int = 2):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("wrn10_1", 10)
    reset_classifier(model, 5)
    prepared = METHODS["piggyback"].prepare(model, head=("fc",), masks=MaskSettings(mask_init="constant"))
    opt = build_optimizers(prepared, SimpleNamespace(optimizer="adam", lr=1e-2, weight_decay=0.0, head_optimizer="adam",
                                                     head_lr=1e-2, head_weight_decay=0.0))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 5, (12,), generator=g))
    train = DataLoader(data, batch_size=4, sampler=make_sampler(data, None, shuffle=True, seed=0))
    val = DataLoader(data, batch_size=6)
    train_model, eval_model = compile_model(model, DistInfo(), compiled)
    graphs = []

    def set_epoch(epoch):
        train.sampler.set_epoch(epoch)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    torch.manual_seed(0)
    result = fit(RunDir(out), FitState(model, opt, train_model=train_model, eval_model=eval_model),
                 ClassificationPipeline(CPU, val, 5), train, epochs=epochs, config={}, dist=DistInfo(),
                 set_epoch=set_epoch, print_freq=100, log=lambda *_: None)
    graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return result, graphs


@pytest.mark.slow
def test_compiled_run_matches_eager_and_compiles_once(tmp_path):
    pytest.importorskip("torch._inductor")
    eager, _ = _run(tmp_path / "eager", False)
    compiled, graphs = _run(tmp_path / "compiled", True)
    for e, c in zip(eager.history, compiled.history):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4, abs=1e-5)
        assert c["val_loss"] == pytest.approx(e["val_loss"], rel=1e-4, abs=1e-5)
    # graphs[0]: before training; [1]: after epoch 1 (train + eval compiled); [2]: after epoch 2
    assert graphs[1] > graphs[0] and graphs[2] == graphs[1], graphs


def test_compile_flag_values_of_decathlon_train():
    """--compile: auto follows the device, cudagraphs asks torch.compile for CUDA graphs
    (mode reduce-overhead), and an unknown value is refused by the parser."""
    from common.distributed import DistInfo
    from common.runtime import resolve_compile
    from decathlon.train import parse_config
    from decathlon.training import POLICY

    def use_compile(args, dist):
        return resolve_compile(args.compile, dist, POLICY)
    cpu, cuda = DistInfo(device=torch.device("cpu")), DistInfo(device=torch.device("cuda"))
    ddp = DistInfo(device=torch.device("cuda"), world_size=2)

    def parse(argv):
        return parse_config(["--backbone", "x.pt", *argv])

    for value, on_cpu, on_cuda, on_ddp in (("auto", False, "reduce-overhead", True), ("on", True, True, True),
                                           ("off", False, False, False),
                                           ("cudagraphs", "reduce-overhead", "reduce-overhead", "reduce-overhead")):
        args = parse(["--task", "dtd", "--compile", value])
        assert (use_compile(args, cpu), use_compile(args, cuda), use_compile(args, ddp)) == (on_cpu, on_cuda, on_ddp)
    with pytest.raises(SystemExit):
        parse(["--task", "dtd", "--compile", "fast"])


def test_precision_defaults_follow_compilation_on_cuda():
    """--channels-last auto: on where the network is compiled on a CUDA device, off eager
    and on the CPU; --amp auto: off everywhere (bf16 cost accuracy on real images);
    on/off override auto either way."""
    from common.runtime import resolve_runtime
    from decathlon.train import parse_config
    from decathlon.training import POLICY
    cpu, cuda = DistInfo(device=torch.device("cpu")), DistInfo(device=torch.device("cuda"))
    ddp = DistInfo(device=torch.device("cuda"), world_size=2)

    def parse(argv):
        return parse_config(["--backbone", "x.pt", *argv])

    def switches(flags, dist):
        prec = resolve_runtime(parse(["--task", "dtd", *flags]), dist, POLICY).prec
        return prec.amp, prec.channels_last

    for compile_flag, on_cpu, on_cuda, on_ddp in (("auto", (False, False), (False, True), (False, True)),
                                                  ("cudagraphs", (False, False), (False, True), (False, True)),
                                                  ("on", (False, False), (False, True), (False, True)),
                                                  ("off", (False, False), (False, False), (False, False))):
        flags = ["--compile", compile_flag]
        assert (switches(flags, cpu), switches(flags, cuda), switches(flags, ddp)) == (on_cpu, on_cuda, on_ddp), \
            compile_flag
    assert switches(["--amp", "on"], cuda) == (True, True)
    assert switches(["--channels-last", "off"], cuda) == (False, False)
    assert switches(["--channels-last", "on", "--compile", "off", "--amp", "on"], cuda) == (True, True)
    assert switches(["--amp", "on", "--channels-last", "on"], cpu) == (True, True)


def test_optimizer_kernels_by_device_and_group_size():
    """make_optimizer asks torch for its fused kernels when every parameter is a floating
    CUDA tensor; on the CPU for its multi-tensor kernels in small groups only."""
    from common.optimizers import fused_implementation, make_optimizer

    from common.optimizers import SMALL_GROUP

    class FakeCuda:
        is_cuda = True

        def __init__(self, floating=True):
            self.floating = floating

        def is_floating_point(self):
            return self.floating

        def numel(self):
            return 3

    assert fused_implementation([FakeCuda(), FakeCuda()]) == {"fused": True}
    assert fused_implementation([FakeCuda(), FakeCuda(floating=False)]) == {}
    assert fused_implementation([FakeCuda(), torch.zeros(2)]) == {}
    assert fused_implementation([]) == {}
    # CPU: multi-tensor kernels for small groups (scalars, a classifier), torch's default for masks
    assert fused_implementation([torch.zeros(1)] * 200) == {"foreach": True}
    assert fused_implementation([torch.zeros(SMALL_GROUP // 2 + 1)] * 2) == {}
    for name in ("adam", "adamw", "sgd"):
        opt = make_optimizer(name, [torch.nn.Parameter(torch.zeros(3))], lr=0.1)
        assert not opt.defaults.get("fused") and opt.defaults.get("foreach"), name
        big = make_optimizer(name, [torch.nn.Parameter(torch.zeros(SMALL_GROUP + 1))], lr=0.1)
        assert not big.defaults.get("fused") and not big.defaults.get("foreach"), name


def test_cuda_graph_mode_marks_a_new_step_on_every_call(monkeypatch):
    """Under mode reduce-overhead each call of the compiled model (a training or an
    evaluation step) starts a new CUDA graph step; other modes leave the marker alone."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    torch._dynamo.reset()
    model = torch.nn.Linear(3, 2)
    train_model, eval_model = compile_model(model, DistInfo(), "reduce-overhead", backend="eager")
    x = torch.randn(4, 3)
    train_model(x).sum().backward()
    with torch.no_grad():
        eval_model(x)
        eval_model(x)
    assert len(marks) == 3
    marks.clear()
    train_model, _ = compile_model(model, DistInfo(), True, backend="eager")
    train_model(x)
    assert marks == []


def test_compile_for_eval_modes(monkeypatch):
    """The evaluation entry points' --compile: auto and off leave the network alone; on
    compiles it (same outputs); cudagraphs asks for mode reduce-overhead; each compilation
    first drops the graphs of earlier networks; an unknown value is refused by name."""
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).eval()
    resets = []
    real_reset = torch.compiler.reset
    monkeypatch.setattr(torch.compiler, "reset", lambda: (resets.append(1), real_reset()))
    assert set(EVAL_COMPILE_MODES) == {"auto", "off", "on", "cudagraphs"}
    assert compile_for_eval(model, "auto") is model and compile_for_eval(model, "off") is model and not resets
    x = torch.randn(4, 5)
    compiled = compile_for_eval(model, "on")
    assert compiled is not model and resets == [1]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    modes = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: (modes.append(kw.get("mode")), real_compile(m, **kw))[1])
    compile_for_eval(torch.nn.Linear(2, 2), "cudagraphs")
    assert modes == ["reduce-overhead"] and resets == [1, 1]
    with pytest.raises(ValueError, match="'fast'"):
        compile_for_eval(model, "fast")


def test_networks_compiled_one_after_another_each_get_their_own_graphs():
    """decathlon.train --task all compiles one network per task in one process: every task
    must be compiled, not only the first four before torch's recompile limit (8 graphs per
    forward) sends the rest to eager mode."""
    from torch._dynamo.utils import counters

    class Net(torch.nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.body, self.fc = torch.nn.Linear(6, 8), torch.nn.Linear(8, classes)

        def forward(self, x):
            return self.fc(torch.relu(self.body(x)))

    x = torch.randn(2, 6)
    new_graphs = []
    for task in range(10):
        train_model, eval_model = compile_model(Net(3 + task), DistInfo(), True, backend="eager")
        before = counters["stats"]["unique_graphs"]
        train_model(x).sum().backward()
        with torch.no_grad():
            eval_model.eval()
            eval_model(x)
        new_graphs.append(counters["stats"]["unique_graphs"] - before)
    assert new_graphs == [2] * 10, new_graphs
