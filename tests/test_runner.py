"""The one training runner (common.runner) on a pipeline written in this file: what a new
pipeline supplies is enough to train, resume and finish, and the random generators follow
the order every run of the toolkit has used (so earlier config.json files reproduce)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from common.classify import ClassificationPipeline
from common.config import TrainConfig
from common.distributed import DistInfo
from common.loaders import build_loader, set_loader_epoch
from common.runner import Data, TrainingTask, run_training


@dataclass(frozen=True)
class ToyConfig(TrainConfig):
    PROG: ClassVar[str] = "toy.train"

    @classmethod
    def needs_backbone_file(cls) -> bool:
        return False


class ToyTask(TrainingTask):
    """Three Gaussian blobs in 8-D, a two-layer network whose first layer is 'pretrained'."""

    data_draws = False      # the loaders draw from the global generators
    weights_draw = False    # opening the weights does

    def open_weights(self, runtime):
        if self.weights_draw:
            torch.rand(3)

    def build_data(self, runtime) -> Data:
        if self.data_draws:
            torch.rand(7), np.random.rand(2), random.random()
        g = torch.Generator().manual_seed(5)
        centres = torch.randn(3, 8, generator=g) * 3
        y = torch.arange(48) % 3
        x = centres[y] + torch.randn(48, 8, generator=g)
        common = dict(batch_size=8, workers=0, dist_info=self.dist, seed=self.cfg.seed)
        train = build_loader(TensorDataset(x[:36], y[:36]), train=True, **common)
        val = build_loader(TensorDataset(x[36:], y[36:]), train=False, **common)
        return Data(train, val, lambda epoch: set_loader_epoch(train, epoch), {"train_images": 36})

    def build_model(self, runtime, data):
        g = torch.Generator().manual_seed(1)  # the frozen 'backbone' is the same in every run
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
        with torch.no_grad():
            model[0].weight.copy_(torch.randn(32, 8, generator=g) * 0.5)
        model[2].reset_parameters()  # the new head draws from the seeded generators
        return model, ("2",), {"arch": "mlp"}

    def build_pipeline(self, runtime, data, model):
        return ClassificationPipeline(runtime.prec, data.eval, 3)

    def results(self, model, data, result, facts, pipeline):
        top1 = result.record["val_top1"]
        meta = {"task": "blobs", "arch": "mlp", "num_classes": 3}
        return meta, {"val_top1": top1}, f"done: val top-1 {top1:.2f}%"


def _train(out, epochs=3, task_cls=ToyTask, **settings):
    values = {"out": str(out), "epochs": epochs, "batch_size": 8, "workers": 0, "device": "cpu",
              "lr": 0.05, "lr_steps": [], "print_freq": 100, **settings}
    cfg = ToyConfig.build(("test", values))
    lines = []
    metrics = run_training(task_cls(cfg, DistInfo(), lines.append))
    return metrics, lines


def _masks(out):
    return load_file(str(out / "masks.safetensors"))


def test_a_pipeline_of_hooks_trains_resumes_and_finishes(tmp_path):
    metrics, _ = _train(tmp_path / "a")
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"config.json", "log.jsonl", "checkpoint.pt", "masks.safetensors", "metrics.json", "curves.png",
            "sparsity.png"} <= files
    assert metrics["val_top1"] > 60 and 0 <= metrics["sparsity"] < 1
    assert json.loads((tmp_path / "a" / "config.json").read_text())["resolved"]["arch"] == "mlp"
    # the same run in two parts (one epoch, then grown to three) gives the same masks
    _train(tmp_path / "b", epochs=1)
    _train(tmp_path / "b", epochs=3)
    a, b = _masks(tmp_path / "a"), _masks(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run run again writes nothing
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}
    again, lines = _train(tmp_path / "a")
    assert again == metrics and "unchanged" in lines[-1]
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").iterdir()}


def test_what_the_loaders_draw_never_reaches_the_model_and_what_the_weights_draw_does(tmp_path):
    class DataDraws(ToyTask):
        data_draws = True

    class WeightsDraw(ToyTask):
        weights_draw = True

    for name, task_cls in (("plain", ToyTask), ("data", DataDraws), ("weights", WeightsDraw)):
        _train(tmp_path / name, task_cls=task_cls)
    plain, data, weights = (_masks(tmp_path / name) for name in ("plain", "data", "weights"))
    assert all(torch.equal(plain[k], data[k]) for k in plain)
    assert any(not torch.equal(plain[k], weights[k]) for k in plain)


@pytest.mark.parametrize("shape", [(40, 100), (60, 100), (100, 60), (90, 120), (50, 50)])
def test_square_preprocessing_resizes_the_whole_image_as_it_always_has(shape):
    """Whole image to resize x resize (area filter when the square is smaller than the
    shorter side, bilinear otherwise), then the centre crop: the rule runs trained under."""
    import cv2
    from decathlon.tasks import get_task
    from decathlon.transforms import build_transforms
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = build_transforms("dtd", False, resize=72, crop=64)(img)
    interp = cv2.INTER_AREA if 72 < min(shape) else cv2.INTER_LINEAR
    expected = cv2.resize(img, (72, 72), interpolation=interp)[4:68, 4:68]
    spec = get_task("dtd")
    x = torch.from_numpy(np.ascontiguousarray(expected.transpose(2, 0, 1))).float()
    ref = (x - torch.tensor(spec.mean).view(3, 1, 1) * 255) / (torch.tensor(spec.std).view(3, 1, 1) * 255)
    assert torch.allclose(out, ref, atol=1e-5)
