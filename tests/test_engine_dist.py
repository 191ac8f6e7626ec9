"""The engine on two gloo processes: each rank checkpoints and restores its own RNG
state, so a resumed run with dropout equals an uninterrupted one."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.slow  # multi-process runs: left out of the fast subset

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _worker(rank, world_size, port, out_dir):
    # The test process hosts the rendezvous store, as torchrun's agent does.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    from common.amp import Precision
    from common.checkpoint import load_training_checkpoint
    from common.classify import ClassificationPipeline
    from common.distributed import barrier, cleanup, init_distributed, make_sampler
    from common.engine import FitState, compile_model, fit
    from common.runlog import RunDir
    from common.seed import seed_everything

    info = init_distributed("cpu")
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))

    def run(folder, epochs, perturb):
        torch.manual_seed(0)  # the same initial weights on every rank
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
        seed_everything(5, info.rank)  # then each rank its own stream (dropout)
        if perturb:  # a new process starts from other RNG states
            torch.manual_seed(100 + rank)
        train = DataLoader(data, batch_size=4, sampler=make_sampler(data, info, True, 5))
        val = DataLoader(data, batch_size=8, sampler=make_sampler(data, info, False, 0))
        train_model, eval_model = compile_model(model, info, False)
        opt = {"main": torch.optim.SGD(model.parameters(), lr=0.1)}
        fit(RunDir(folder, info.is_main), FitState(model, opt, train_model=train_model, eval_model=eval_model),
            ClassificationPipeline(Precision(info.device), val, 3), train, epochs=epochs, config={"seed": 5},
            dist=info, set_epoch=train.sampler.set_epoch, print_freq=100, log=lambda *_: None)
        return model

    full = run(os.path.join(out_dir, "full"), 3, False)
    run(os.path.join(out_dir, "split"), 1, False)
    resumed = run(os.path.join(out_dir, "split"), 3, True)
    if info.is_main:
        ckpt = load_training_checkpoint(os.path.join(out_dir, "split", "checkpoint.pt"))
        torch.save({"full": full.state_dict(), "resumed": resumed.state_dict(),
                    "rng_torch": [r["torch"] for r in ckpt["rng"]]}, os.path.join(out_dir, "result.pt"))
    barrier()
    cleanup()


def test_each_rank_resumes_its_own_random_stream(tmp_path, monkeypatch):
    for key in _TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(_worker, args=(2, store.port, str(tmp_path)), nprocs=2, join=True)
    del store
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    rngs = result["rng_torch"]
    assert len(rngs) == 2 and not torch.equal(rngs[0], rngs[1])  # one state per rank
    for key, value in result["full"].items():
        assert torch.equal(value, result["resumed"][key]), key
