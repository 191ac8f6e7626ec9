"""Tests for the shared training utilities: checkpoints and RNG state, run folders and
logging, seeding, samplers, command-line flags, autocast, and DDP on two gloo processes."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar, Optional
import json
import os
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import common.atomic as atomic
from common.amp import autocast, default_amp, maybe_channels_last
from common.checkpoint import (CHECKPOINT_VERSION, CheckpointError, load_checkpoint,
                               rng_state, save_checkpoint, set_rng_state)
from common.cli import resolve_device
from common.config import RunConfig, option
from common.errors import UsageError
from common.distributed import (DistInfo, ShardSampler, init_distributed,
                                make_sampler, unwrap, wrap_ddp)
from common.meters import MetricLogger, non_finite_message
from common.runlog import RunDir
from common.seed import epoch_generator, reseed_loader, seed_everything, worker_init_fn

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for key in _TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)


def _draws():
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3),
            torch.randn(2))


# ----------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_restores_state_and_rng(tmp_path):
    seed_everything(3)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    _draws()  # move every generator away from its seed
    path = save_checkpoint(tmp_path / "ck" / "checkpoint.pt",
                           {"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "epoch": 4, "rng": rng_state()})
    after_save = _draws()
    _draws()

    state = load_checkpoint(path)  # weights_only=True inside
    assert state["format_version"] == CHECKPOINT_VERSION and state["epoch"] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value)
    fresh = torch.optim.Adam(nn.Linear(4, 2).parameters(), lr=0.1)
    fresh.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    replay = _draws()
    assert replay[0] == after_save[0] and replay[1] == after_save[1]
    assert torch.equal(replay[2], after_save[2]) and torch.equal(replay[3], after_save[3])


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)  # fails after the bytes were written
    with pytest.raises(OSError, match="no space left .* to write checkpoint.pt .*; the previous checkpoint.pt is intact"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.undo()
    with pytest.raises(Exception):  # fails while serialising: nothing reaches the disk
        save_checkpoint(path, {"epoch": 3, "fn": lambda x: x})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temp files


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pt.*does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"definitely not a torch file")
    with pytest.raises(CheckpointError, match="corrupt.pt.*corrupt"):
        load_checkpoint(corrupt)
    old = tmp_path / "old.pt"
    torch.save({"format_version": CHECKPOINT_VERSION + 1, "epoch": 0}, old)
    with pytest.raises(CheckpointError, match=f"old.pt has format_version={CHECKPOINT_VERSION + 1}"):
        load_checkpoint(old)
    torch.save({"epoch": 0}, old)
    with pytest.raises(CheckpointError, match="format_version=None"):
        load_checkpoint(old)


def _train(model, dataset, epochs, seed, start=0, opt_state=None):
    """A tiny loop with shuffling and dropout: everything random that resume must replay."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    sampler = make_sampler(dataset, None, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return opt


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(18, 5, generator=g), torch.randn(18, 1, generator=g))
    make = lambda: nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 1))  # noqa: E731

    seed_everything(7)
    full = make()
    _train(full, data, 3, seed=7)

    seed_everything(7)
    part = make()
    opt = _train(part, data, 1, seed=7)
    save_checkpoint(tmp_path / "c.pt", {"model": part.state_dict(), "optimizer": opt.state_dict(),
                                        "epoch": 0, "rng": rng_state()})
    torch.rand(100)  # a new process would start from other RNG states
    state = load_checkpoint(tmp_path / "c.pt")
    resumed = make()
    resumed.load_state_dict(state["model"])
    set_rng_state(state["rng"])
    _train(resumed, data, 3, seed=7, start=state["epoch"] + 1, opt_state=state["optimizer"])
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------- run folders and logging

def test_run_dir_config_log_and_json(tmp_path):
    run = RunDir(tmp_path / "run")
    args = argparse.Namespace(lr=1e-4, out=tmp_path / "run", topk=(1, 5))
    run.write_config(args)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["lr"] == 1e-4 and config["topk"] == [1, 5] and config["out"] == str(tmp_path / "run")
    assert config["torch_version"] == torch.__version__ and "git_commit" in config
    assert isinstance(config["command_line"], list)
    with pytest.raises(ValueError, match="git_commit"):
        run.write_config({"git_commit": "x"})

    run.log_epoch({"epoch": 0, "loss": torch.tensor(0.5), "top1": np.float32(12.5)})
    run.log_epoch({"epoch": 1, "loss": 0.25, "iou": [0.5, float("nan")]})
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == [{"epoch": 0, "loss": 0.5, "top1": 12.5},
                       {"epoch": 1, "loss": 0.25, "iou": [0.5, None]}]
    run.trim_log(1)  # a run resuming at epoch 1 drops what it will log again
    assert run.read_log() == records[:1]

    run.write_json("metrics.json", {"mean_iou": 0.5})
    assert run.read_json("metrics.json") == {"mean_iou": 0.5}
    with pytest.raises(TypeError, match="object"):
        run.write_json("bad.json", {"x": object()})
    assert not (tmp_path / "run" / "bad.json").exists()


def test_run_dir_on_other_ranks_writes_nothing(tmp_path):
    run = RunDir(tmp_path / "rank1", is_main=False)
    run.write_config({"a": 1})
    run.log_epoch({"epoch": 0})
    run.write_json("m.json", {})
    assert not (tmp_path / "rank1").exists()


def test_non_finite_message_names_epoch_and_step():
    assert non_finite_message(float("nan"), 17, 2) .startswith("non-finite loss nan at epoch 2 step 17")
    assert "at step 5" in non_finite_message(float("inf"), 5)


def test_metric_logger_progress_and_averages():
    lines = []
    logger = MetricLogger(print_fn=lines.append)
    seen = []
    for i in logger.log_every(range(5), print_freq=2, header="Epoch: [0]"):
        logger.update(n=2 if i < 4 else 1, loss=torch.tensor(float(i)))
        seen.append(i)
    assert seen == list(range(5))
    # steps 0, 2 and the last (4) print, then the summary line
    assert len(lines) == 4 and all(line.startswith("Epoch: [0]") for line in lines)
    assert "[0/5]" in lines[0] and "eta: " in lines[0] and "loss: " in lines[0]
    assert "[4/5]" in lines[2] and "total time" in lines[3]
    assert logger.meters["loss"].global_avg == pytest.approx((2 * (0 + 1 + 2 + 3) + 4) / 9)
    quiet = []
    for _ in MetricLogger(is_main=False, print_fn=quiet.append).log_every([1, 2], 1):
        pass
    assert quiet == []


# ----------------------------------------------------------------- seeding and samplers

def test_single_process_sampler_order_depends_only_on_seed_and_epoch():
    data = list(range(20))
    a = make_sampler(data, None, shuffle=True, seed=5)
    orders = []
    for epoch in range(3):
        a.set_epoch(epoch)
        torch.rand(7)  # global RNG use must not matter
        orders.append(list(a))
    b = make_sampler(data, None, shuffle=True, seed=5)
    b.set_epoch(2)
    torch.manual_seed(123)
    assert list(b) == orders[2]  # a resumed run jumps straight to epoch 2
    assert orders[0] != orders[1] and sorted(orders[0]) == data
    c = make_sampler(data, None, shuffle=True, seed=6)
    assert list(c) != orders[0]
    assert list(make_sampler(data, None, shuffle=False, seed=0)) == data
    assert isinstance(make_sampler(data, DistInfo(), shuffle=True, seed=0), DistributedSampler)


def test_distributed_samplers_partition_the_data():
    data = list(range(7))
    train = [make_sampler(data, DistInfo(rank=r, world_size=2, is_main=r == 0, distributed=True),
                          shuffle=True, seed=1) for r in range(2)]
    assert all(isinstance(s, DistributedSampler) for s in train)
    assert len(train[0]) == len(train[1]) == 4  # training pads to equal lengths
    evals = [make_sampler(data, DistInfo(rank=r, world_size=2, distributed=True),
                          shuffle=False, seed=1) for r in range(2)]
    assert all(isinstance(s, ShardSampler) for s in evals)
    assert sorted(list(evals[0]) + list(evals[1])) == data  # evaluation: each example once
    assert [len(s) for s in evals] == [4, 3]


class _RandomItems(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.tensor([random.random(), float(np.random.rand()), torch.rand(()).item()])


def test_worker_seeding_follows_loader_generator():
    def epoch_values(epoch, seed=0):
        loader = DataLoader(_RandomItems(), batch_size=2, num_workers=2,
                            worker_init_fn=worker_init_fn, generator=epoch_generator(seed),
                            sampler=make_sampler(range(6), None, shuffle=False, seed=0))
        reseed_loader(loader, seed, epoch)
        np.random.seed(999)  # the main process's RNGs must not leak into workers
        return torch.cat(list(loader))

    first = epoch_values(1)
    assert torch.equal(first, epoch_values(1))
    assert not torch.equal(first, epoch_values(2))
    assert len(set(first[:, 1].tolist())) == 6  # workers do not repeat each other
    with pytest.raises(ValueError, match="generator"):
        reseed_loader(DataLoader(_RandomItems()), 0, 0)


def test_worker_init_fn_derives_python_and_numpy_seeds_from_torch():
    def after(torch_seed):
        torch.manual_seed(torch_seed)  # what a DataLoader worker has: base_seed + worker_id
        random.seed(1)
        np.random.seed(1)
        worker_init_fn(0)
        return random.random(), float(np.random.rand())

    assert after(11) == after(11)
    assert after(11)[0] != after(12)[0] and after(11)[1] != after(12)[1]


def test_seed_everything_reproduces_and_offsets_by_rank():
    assert seed_everything(4) == 4
    a = _draws()
    seed_everything(4)
    assert _draws()[1] == a[1]
    assert seed_everything(4, rank=1) == 5
    assert _draws()[1] != a[1]


# ----------------------------------------------------------------- command line

@dataclass(frozen=True)
class _Config(RunConfig):
    PROG: ClassVar[str] = "prog"
    DATA_ROOT_ENV: ClassVar[Optional[str]] = "PB_TEST_DATA_ROOT"
    data_root: Optional[str] = option("data/x", "the data folder", metavar="DIR", path=True)
    epochs: int = option(3, "training epochs", type=int)


def _config(argv):
    return _Config.from_cli(argv)


def test_cli_defaults_env_and_validation(monkeypatch, capsys):
    from common.cli import resolve_threads, resolve_workers, usable_cores
    monkeypatch.delenv("PB_TEST_DATA_ROOT", raising=False)
    cfg = _config([])
    assert (cfg.data_root, cfg.epochs, cfg.out, cfg.seed, cfg.device, cfg.workers) == \
        (os.path.abspath("data/x"), 3, os.path.abspath("runs/latest"), 0, "auto", None)
    # threads and workers fit the cores this process may use
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    workers = resolve_workers(None)
    assert workers == min(8, usable_cores() // 2) and workers + resolve_threads(None, workers) <= max(2, usable_cores())
    assert resolve_threads(3, workers) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a user's explicit setting is kept; --threads overrides it
    assert resolve_threads(None, 0) == 1 and resolve_threads(2, 0) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert resolve_threads(None, 0) == max(1, usable_cores())
    monkeypatch.setenv("PB_TEST_DATA_ROOT", "/elsewhere")
    assert _config([]).data_root == "/elsewhere"
    assert _config(["--data-root", "d"]).data_root == os.path.abspath("d")
    for bad in (["--epochs", "0"], ["--device", "gpu"], ["--workers", "-1"], ["--threads", "0"]):
        with pytest.raises(UsageError):
            _config(bad)
    with pytest.raises(SystemExit):
        _config(["--epochs", "three"])
    err = capsys.readouterr().err
    assert "prog: error: argument --epochs: invalid int value" in err
    assert len(err.strip().splitlines()) == 2  # the one-line usage and the error, not the whole block
    for action in _Config.parser()._actions:
        assert action.help and len(action.help) > 15, action.dest


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="'cuda:1'.*CUDA is not available"):
        resolve_device("cuda:1")


# ----------------------------------------------------------------- mixed precision

def test_autocast_and_channels_last():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu", enabled=False):
        assert (a @ b).dtype == torch.float32
    with autocast(torch.device("cpu"), enabled=True):
        assert (a @ b).dtype == torch.bfloat16
    assert default_amp("cpu") is False
    x = maybe_channels_last(torch.randn(2, 3, 4, 5), True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    conv = maybe_channels_last(nn.Conv2d(3, 4, 3), True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    y = torch.randn(2, 3, 4, 5)
    assert maybe_channels_last(y, False) is y


# ----------------------------------------------------------------- distributed

def test_single_process_fallback_and_bad_env(monkeypatch):
    info = init_distributed("cpu")
    assert info == DistInfo(device=torch.device("cpu"))
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, info) is model and unwrap(model) is model
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match="WORLD_SIZE"):
        init_distributed("cpu")


def _tiny_masked_model():
    from common.masking import mask_parameters, piggyback
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4),
                                      relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
                                      flat=nn.Flatten(), fc=nn.Linear(4, 3)))
    piggyback(model, skip=("fc",), mask_init="uniform")
    return model, mask_parameters(model)


def _batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)


def _ddp_worker(rank, world_size, port, out_dir):
    # The test process hosts the rendezvous store (as torchrun's agent does), so no port
    # is left free between choosing it and binding it for another process to take.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    from common.distributed import all_reduce_sum, barrier, cleanup
    info = init_distributed("cpu")
    model, _ = _tiny_masked_model()
    ddp = wrap_ddp(model, info)  # find_unused_parameters=False with frozen weights
    assert isinstance(ddp, nn.parallel.DistributedDataParallel) and unwrap(ddp) is model
    x, y = _batch(rank)
    nn.functional.cross_entropy(ddp(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    total = all_reduce_sum(torch.tensor([float(rank + 1)]))
    torch.save({"grads": grads, "frozen_grads": frozen_grads, "total": total.item()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    del ddp
    # Nobody leaves the group while a peer may still talk to it.
    barrier()
    cleanup()


def test_ddp_on_masked_model_averages_gradients_like_one_big_batch(tmp_path):
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(_ddp_worker, args=(2, store.port, str(tmp_path)), nprocs=2, join=True)
    del store
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model, masks = _tiny_masked_model()
    x = torch.cat([_batch(0)[0], _batch(1)[0]])
    y = torch.cat([_batch(0)[1], _batch(1)[1]])
    nn.functional.cross_entropy(model(x), y).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert "conv.mask_real" in expected and "fc.weight" in expected and len(masks) == 1
    for res in results:
        assert res["total"] == 3.0 and res["frozen_grads"] == []
        assert res["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(res["grads"][name], grad, rtol=1e-5, atol=1e-6)


def test_unavailable_device_ends_a_command_with_one_clear_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        _Config.run(lambda cfg: resolve_device(cfg.device), ["--device", "cuda"])
    assert stop.value.code == 2
    assert "prog: error: device 'cuda' was requested but CUDA is not available" in capsys.readouterr().err
