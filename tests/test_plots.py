"""common.plots: the pictures of a run folder, drawn from whatever its files hold."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from common.accounting import sparsity
from common.maskfile import save_masks
from common.masking import mask_parameters, piggyback
from common.plots import (CURVES_PNG, SPARSITY_PNG, plot_grouped_bars, plot_sparsity,
                          plot_training_curves, save_run_plots)
from decathlon.models import create_model


def _png(path):
    assert (path.stat().st_mode & 0o777) == 0o644
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.array(img.convert("RGB"))


def _log(folder, records, extra_lines=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")


def test_curves_from_a_decathlon_log(tmp_path):
    records = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "train_top1": 20.0 * e,
                "val_top1": 18.0 * e, "lr": [1e-4]} for e in range(1, 5)]
    _log(tmp_path, records)
    (tmp_path / "config.json").write_text(json.dumps({"task": "svhn", "method": "piggyback"}))
    written = save_run_plots(tmp_path)
    assert written == [tmp_path / CURVES_PNG]
    picture = _png(written[0])
    assert picture.shape[1] >= 800 and picture.std() > 10  # two panels with something drawn


def test_segmentation_log_fractions_and_damaged_lines(tmp_path):
    records = [{"epoch": 1, "train_loss": 1.5, "pixel_acc": 0.6, "mean_iou": 0.2, "sparsity": 0.01},
               {"epoch": 2, "train_loss": None, "pixel_acc": 0.7, "mean_iou": float("nan")},
               {"epoch": 3, "train_loss": 0.9, "pixel_acc": 0.8, "mean_iou": 0.5}]
    # a line cut short by a killed run, a non-object line, NaN written by a lax writer
    _log(tmp_path, records, extra_lines=['{"epoch": 4, "train_lo', "[1, 2]", '{"epoch": 5, "train_loss": NaN}'])
    assert save_run_plots(tmp_path) == [tmp_path / CURVES_PNG]


@pytest.mark.parametrize("content", [None, "", "not json\n", '{"epoch": 1, "lr": [0.1]}\n'])
def test_nothing_to_draw_writes_nothing(tmp_path, content):
    if content is not None:
        (tmp_path / "log.jsonl").write_text(content)
    (tmp_path / "metrics.json").write_text("{broken")
    (tmp_path / "config.json").write_text("[]")
    assert save_run_plots(tmp_path) == []
    assert not list(tmp_path.glob("*.png"))
    assert save_run_plots(tmp_path / "no-such-run") == []


def test_sparsity_from_metrics_or_from_the_mask_file(tmp_path):
    torch.manual_seed(0)
    model = piggyback(create_model("wrn10_1", 5), skip=("fc",))
    with torch.no_grad():
        for m in mask_parameters(model):
            m.copy_(torch.rand(m.shape) * 0.012)
    expected = sparsity(model)
    from_file = tmp_path / "a"
    from_file.mkdir()
    save_masks(model, from_file / "masks.safetensors", task="svhn")
    (from_file / "metrics.json").write_text(json.dumps({"sparsity": expected["total"]}))  # no per-layer key
    assert save_run_plots(from_file) == [from_file / SPARSITY_PNG]
    _png(from_file / SPARSITY_PNG)

    from_metrics = tmp_path / "b"
    layers = dict(expected["layers"], broken="x")  # a value that is not a number is left out
    _log(from_metrics, [{"epoch": 1, "train_loss": 1.0}])
    (from_metrics / "metrics.json").write_text(json.dumps({"sparsity_layers": layers}))
    assert save_run_plots(from_metrics) == [from_metrics / CURVES_PNG, from_metrics / SPARSITY_PNG]

    damaged = tmp_path / "c"
    damaged.mkdir()
    (damaged / "masks.safetensors").write_bytes(b"\x00" * 64)
    with pytest.warns(UserWarning, match="masks.safetensors"):
        assert save_run_plots(damaged) == []


def test_plot_functions_write_atomically_readable_pngs(tmp_path):
    assert plot_training_curves([], tmp_path / "none.png") is None
    path = plot_sparsity({"svhn": {"conv1": 0.1, "fc": 0.5}, "dtd": {"conv1": 0.2}}, tmp_path / "s.png")
    _png(path)
    bars = plot_grouped_bars([("top-1 (%)", {"ours": {"a": 50.0, "b": None}, "paper": {"a": 60.0, "b": 70.0}})],
                             ["a", "b"], tmp_path / "bars.png", notes={"b": "missing"}, title="t")
    _png(bars)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png", "s.png"]  # no temporary files left
    assert not math.isnan(float(_png(bars).mean()))
