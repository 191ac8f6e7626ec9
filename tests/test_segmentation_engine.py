"""Training and evaluation loops: loss, hand-computed metrics, shards, non-finite losses."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.errors import DivergedError
from segmentation.data import IGNORE_INDEX
from common.engine import train_one_epoch
from segmentation.engine import SegmentationPipeline, evaluate_segmentation, segmentation_loss, summarize


class EchoModel(nn.Module):
    """Predicts the class id written in the image's first channel (21 classes)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return F.one_hot(x[:, 0].long(), 21).permute(0, 3, 1, 2).float() * self.scale


def _batch(pred, target):
    image = torch.tensor(pred, dtype=torch.float32).unsqueeze(0).expand(3, -1, -1).unsqueeze(0)
    return image, torch.tensor(target).unsqueeze(0)


def test_evaluate_against_a_hand_computed_matrix():
    X = IGNORE_INDEX
    loader = [_batch([[0, 1, 1], [1, 2, 0]], [[0, 0, 1], [1, 2, X]]),
              _batch([[2, 0], [0, 1]], [[2, 2], [0, X]])]
    # Rows = truth: [[2, 1, 0], [0, 2, 0], [1, 0, 2]]; columns sum to 3, 3, 2.
    m = evaluate_segmentation(EchoModel(), loader, torch.device("cpu"), 21, is_main=False)
    assert m["pixels"] == 8
    assert m["pixel_acc"] == pytest.approx(6 / 8)
    assert m["mean_acc"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["mean_iou"] == pytest.approx((2 / 4 + 2 / 3 + 2 / 3) / 3)
    assert m["fw_iou"] == pytest.approx(29 / 48)
    assert math.isnan(m["iou"][5])
    named = summarize(m, [f"c{i}" for i in range(21)])
    assert named["per_class_iou"]["c0"] == pytest.approx(0.5) and "iou" not in named


def test_loss_ignores_void_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 21, 4, 5, requires_grad=True)
    target = torch.randint(0, 21, (2, 4, 5))
    target[0, :2] = IGNORE_INDEX
    keep = target != IGNORE_INDEX
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], target[keep])
    torch.testing.assert_close(segmentation_loss(logits, target), expected)
    void = segmentation_loss(logits, torch.full_like(target, IGNORE_INDEX))
    void.backward()
    assert void.item() == 0 and logits.grad is not None and logits.grad.abs().sum() == 0


def test_train_one_epoch_steps_every_optimizer_and_stops_on_nan():
    model = EchoModel()
    opts = {"a": torch.optim.SGD([model.scale], lr=0.1)}
    loader = [_batch([[1, 2]], [[1, 2]]), _batch([[0, 0]], [[0, 0]])]
    cpu = torch.device("cpu")
    stats = train_one_epoch(model, loader, SegmentationPipeline(cpu), opts, device=cpu, epoch=1, is_main=False)
    assert model.scale.item() > 1 and math.isfinite(stats["train_loss"])
    bad = [_batch([[1, 2]], [[1, 2]])]
    with torch.no_grad():
        model.scale.fill_(float("nan"))
    with pytest.raises(DivergedError, match="epoch 3 step 0"):
        train_one_epoch(model, bad, SegmentationPipeline(cpu), opts, device=cpu, epoch=3, is_main=False)


def test_recipe_gives_mask_defaults_and_explicit_flags_win():
    from segmentation import train as train_cli
    def resolved(*argv):
        return train_cli.parse_config(["--random-init", *argv])

    paper = resolved("--recipe", "paper")
    assert (paper.mask_init, paper.mask_scale, paper.mask_spread, paper.threshold, paper.optimizer, paper.lr) == \
        ("constant", 1e-2, 0.0, 5e-3, "adam", 1e-4)
    assert resolved().mask_init == "spread"
    mine = resolved("--recipe", "paper", "--mask-init", "weight", "--threshold", "1e-3", "--lr", "2e-4",
                    "--optimizer", "adamw")
    assert (mine.mask_init, mine.threshold, mine.lr, mine.optimizer) == ("weight", 1e-3, 2e-4, "adamw")
    finetune = resolved("--method", "finetune")
    assert finetune.mask_init is None and (finetune.optimizer, finetune.lr, finetune.momentum) == ("sgd", 2e-5, 0.99)
    assert resolved("--compile", "on").compile == "on"
