"""Tests for common.metrics: hand-computed confusion matrices, a brute-force reference,
top-k accuracy, and reduction across two gloo processes."""
from __future__ import annotations

import math
import os
from fractions import Fraction as Fr

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from common.metrics import ConfusionMatrix
from conftest import free_port

T = torch.tensor


def _approx(x):
    return pytest.approx(float(x), rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------- hand-computed cases

def test_confusion_matrix_three_classes_with_ignore():
    # 9 kept pixels, 2 ignored (their predictions must not count).
    target = T([[0, 0, 0, 1, 1, 2], [2, 2, 2, 255, 255, 0]])
    pred = T([[0, 0, 1, 1, 2, 2], [2, 0, 2, 1, 0, 0]])
    cm = ConfusionMatrix(3)
    cm.update(target, pred)
    # The last column pair (0, 0) adds a third correct 0: rows = ground truth.
    expected = T([[3, 1, 0], [0, 1, 1], [1, 0, 3]])
    assert torch.equal(cm.mat, expected) and cm.mat.dtype == torch.int64
    m = cm.compute()
    # rows = cols = [4, 2, 4], total 10, diag 7
    assert m["pixel_acc"] == _approx(Fr(7, 10))
    assert m["mean_acc"] == _approx((Fr(3, 4) + Fr(1, 2) + Fr(3, 4)) / 3)
    iou = [Fr(3, 5), Fr(1, 3), Fr(3, 5)]
    assert m["iou"] == [_approx(v) for v in iou]
    assert m["mean_iou"] == _approx(sum(iou) / 3)
    assert m["fw_iou"] == _approx(Fr(4, 10) * iou[0] + Fr(2, 10) * iou[1] + Fr(4, 10) * iou[2])
    assert m["pixels"] == 10


def test_class_absent_from_both_is_nan_and_left_out_of_means():
    cm = ConfusionMatrix(3)
    cm.update(T([0, 0, 2, 2, 2]), T([0, 2, 2, 2, 0]))
    m = cm.compute()
    assert math.isnan(m["iou"][1]) and math.isnan(m["class_acc"][1])
    assert m["pixel_acc"] == _approx(Fr(3, 5))
    assert m["mean_acc"] == _approx((Fr(1, 2) + Fr(2, 3)) / 2)
    assert m["mean_iou"] == _approx((Fr(1, 3) + Fr(1, 2)) / 2)
    assert m["fw_iou"] == _approx(Fr(2, 5) * Fr(1, 3) + Fr(3, 5) * Fr(1, 2))


def test_class_only_predicted_counts_as_zero_iou_but_not_in_fw_iou():
    cm = ConfusionMatrix(3)
    cm.update(T([0, 0, 1]), T([0, 2, 1]))
    m = cm.compute()
    assert m["iou"] == [_approx(0.5), _approx(1.0), _approx(0.0)]
    assert m["mean_iou"] == _approx(0.5)  # FCN's nanmean keeps the false-positive class
    assert math.isnan(m["class_acc"][2])
    assert m["mean_acc"] == _approx(0.75)
    assert m["fw_iou"] == _approx(Fr(2, 3) * Fr(1, 2) + Fr(1, 3) * 1)


def test_empty_matrix_gives_nan_and_reset_clears():
    cm = ConfusionMatrix(4)
    m = cm.compute()
    assert all(math.isnan(m[k]) for k in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"))
    cm.update(T([1, 255]), T([1, 3]))
    assert cm.mat.sum() == 1
    cm.reset()
    assert cm.mat.sum() == 0


# ----------------------------------------------------------------- brute-force reference

def _reference(pairs, n):
    hist = np.zeros((n, n))
    for t, p in pairs:
        hist[t, p] += 1
    with np.errstate(divide="ignore", invalid="ignore"):
        acc_cls = np.diag(hist) / hist.sum(1)
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    freq = hist.sum(1) / hist.sum()
    return hist, {
        "pixel_acc": np.diag(hist).sum() / hist.sum(),
        "mean_acc": np.nanmean(acc_cls),
        "mean_iou": np.nanmean(iu),
        "fw_iou": (freq[freq > 0] * iu[freq > 0]).sum(),
        "iou": iu,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_bruteforce_reference_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    n = 6
    cm = ConfusionMatrix(n, ignore_index=255)
    pairs = []
    for _ in range(3):  # several batches accumulate into one matrix
        target = rng.integers(0, n - 1, size=(2, 9, 11))  # class n-1 never in ground truth
        pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, n, target.shape))
        target[rng.random(target.shape) < 0.15] = 255
        pred[target == 255] = rng.integers(0, 256, size=int((target == 255).sum()))
        cm.update(torch.from_numpy(target), torch.from_numpy(pred))
        pairs += [(t, p) for t, p in zip(target.ravel(), pred.ravel()) if t != 255]
    hist, ref = _reference(pairs, n)
    np.testing.assert_array_equal(cm.mat.numpy(), hist)
    got = cm.compute()
    for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key
    np.testing.assert_allclose(np.array(got["iou"]), ref["iou"], rtol=1e-12)


# ----------------------------------------------------------------- bad input

@pytest.mark.parametrize("target, pred, match", [
    (T([0, 1]), T([0, 1, 2]), "shape"),
    (T([0, 3]), T([0, 1]), r"target labels \[3\]"),
    (T([0, -1]), T([0, 1]), r"target labels \[-1\]"),
    (T([0, 1]), T([0, 7]), r"prediction labels \[7\]"),
    (T([0.0, 1.0]), T([0, 1]), "integer"),
])
def test_bad_updates_raise_clear_errors(target, pred, match):
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=match):
        cm.update(target, pred)
    assert cm.mat.sum() == 0  # nothing half-counted


def test_prediction_at_ignored_pixels_is_not_checked_and_ignore_index_must_be_outside():
    cm = ConfusionMatrix(3)
    cm.update(T([255, 1]), T([200, 1]))
    assert cm.mat.sum() == 1
    with pytest.raises(ValueError, match="ignore_index=2"):
        ConfusionMatrix(3, ignore_index=2)


def test_update_after_all_reduce_is_refused():
    cm = ConfusionMatrix(3)
    cm.update(T([0]), T([0]))
    cm.all_reduce()
    with pytest.raises(RuntimeError, match="reset"):
        cm.update(T([0]), T([0]))
    cm.reset()
    cm.update(T([1]), T([1]))
    assert cm.mat[1, 1] == 1


# ----------------------------------------------------------------- two processes

def _rank_data(rank):
    """Different data on each rank: rank 1 sees more pixels and other classes."""
    g = torch.Generator().manual_seed(100 + rank)
    target = torch.randint(0, 4 + rank, (3 + rank, 8, 8), generator=g)
    pred = torch.randint(0, 5, target.shape, generator=g)
    target[:, 0] = 255
    return target, pred


def _metrics_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from common.distributed import cleanup, init_distributed
    info = init_distributed("cpu")
    assert info.distributed and info.rank == rank and info.is_main == (rank == 0)
    target, pred = _rank_data(rank)
    cm = ConfusionMatrix(5)
    cm.update(target, pred)
    local = cm.mat.clone()
    cm.all_reduce()
    cm.all_reduce()  # a second call must not sum again
    torch.save({"local": local, "mat": cm.mat, "metrics": cm.compute()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup()


def test_two_process_reduction_equals_single_process_union(tmp_path):
    mp.spawn(_metrics_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert not torch.equal(results[0]["local"], results[1]["local"])  # ranks saw different data

    union = ConfusionMatrix(5)
    for rank in range(2):
        target, pred = _rank_data(rank)
        union.update(target, pred)
    expected = union.compute()
    for res in results:
        assert torch.equal(res["mat"], union.mat)
        assert torch.equal(res["mat"], results[0]["local"] + results[1]["local"])
        for key in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou"):
            assert res["metrics"][key] == expected[key]
        np.testing.assert_array_equal(res["metrics"]["iou"], expected["iou"])
