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
from common.plots import (CURVES_PNG, SPARSITY_PNG, curves_figure, grouped_bars_figure, plot_grouped_bars,
                          plot_sparsity, plot_training_curves, run_description, save_run_plots,
                          sparsity_axis_top, sparsity_figure, thinned_ticks)
from decathlon.networks import create_model


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


def _texts(fig):
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")) if t.get_text()]


def _close(fig):
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_sparsity_axis_fits_low_values():
    values = {f"layer{i}": 0.045 * i / 51 for i in range(52)}  # 0 to 4.5 %
    fig = sparsity_figure(values)
    try:
        ax = fig.axes[0]
        low, high = ax.get_ylim()
        assert low == 0 and 4.5 < high <= 6.0
        assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 9
        assert all(t.get_fontsize() >= 9 for t in ax.texts)  # value labels
        assert 8 <= fig.get_figwidth() <= 13
    finally:
        _close(fig)
    assert sparsity_axis_top(4.5) == 6.0 and sparsity_axis_top(0.3) == pytest.approx(0.4)
    assert sparsity_axis_top(50) == 60 and sparsity_axis_top(95) == 105 and sparsity_axis_top(88) == 100
    assert sparsity_axis_top(0) == 1.0 and sparsity_axis_top(float("nan")) == 1.0


def test_sparsity_ticks_are_thinned_for_many_layers():
    ticks = thinned_ticks(120)
    assert len(ticks) <= 25 and ticks[0] == 0 and ticks[-1] == 119
    assert thinned_ticks(20) == list(range(20)) and len(thinned_ticks(150)) <= 25
    assert all(b > a for a, b in zip(ticks, ticks[1:]))
    fig = sparsity_figure({f"features.{i}.conv.0.0": 0.001 * (i % 7) for i in range(120)})
    try:
        ax = fig.axes[0]
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert 10 <= len(labels) <= 25 and labels[0].startswith("0: ") and labels[-1].startswith("119: ")
        assert len(ax.patches) == 120  # one bar per layer
        assert 0 < len([t for t in ax.texts if t.get_text()]) <= 5  # only the largest values are written
        assert fig.get_figwidth() <= 14
    finally:
        _close(fig)


def test_curves_name_the_evaluation_split_and_dataset():
    records = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "train_top1": 10.0 * e,
                "val_top1": 9.0 * e} for e in (1, 2, 3)]
    fig = curves_figure(records, dataset="mnist", eval_split="test")
    try:
        texts = _texts(fig)
        assert "test top-1" in texts and "test loss" in texts
        assert not any(t.startswith("val") for t in texts)
        assert any("mnist" in t and "test" in t for t in texts)
        assert all(t.get_fontsize() >= 9 for ax in fig.axes for t in ax.get_legend().get_texts())
    finally:
        _close(fig)
    fig = curves_figure([{"epoch": 1, "train_loss": 1.0, "mean_iou": 0.3}], eval_split="seg11valid")
    try:
        assert "mean IoU (seg11valid)" in _texts(fig)
    finally:
        _close(fig)


def test_synthetic_note_is_drawn():
    panels = [("top-1 (%)", {"ours": {"a": 50.0, "b": 60.0}})]
    fig = grouped_bars_figure(panels, ["a", "b"], title="t", synthetic=True)
    try:
        assert any("synthetic data" in t for t in _texts(fig))
        assert all(t.get_fontsize() >= 9 for t in fig.axes[0].texts)
    finally:
        _close(fig)
    fig = grouped_bars_figure(panels, ["a", "b"], title="t")
    try:
        assert not any("synthetic" in t for t in _texts(fig))
    finally:
        _close(fig)
    for fig in (sparsity_figure({"a": 0.1}, synthetic=True),
                curves_figure([{"epoch": 1, "train_loss": 1.0}], note="toy run", synthetic=True)):
        try:
            assert any("synthetic data" in t for t in _texts(fig))
        finally:
            _close(fig)


def test_run_plots_read_split_dataset_and_synthetic_flag(tmp_path, monkeypatch):
    import common.plots as plots

    seen = {}
    real = plots.plot_training_curves
    monkeypatch.setattr(plots, "plot_training_curves", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    _log(tmp_path, [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2, "val_top1": 50.0}])
    (tmp_path / "config.json").write_text(json.dumps({"eval_split": "test", "method": "piggyback",
                                                      "arch": "resnet18", "data_root": "/data/mnist"}))
    (tmp_path / "metrics.json").write_text(json.dumps({"task": "mnist", "split": "test", "synthetic": True}))
    assert save_run_plots(tmp_path) == [tmp_path / CURVES_PNG]
    assert seen["eval_split"] == "test" and seen["dataset"] == "mnist" and seen["synthetic"] is True
    assert "mnist piggyback resnet18" in seen["title"] and "test" in seen["title"]

    describe = run_description
    assert describe({"split": "sbd", "method": "piggyback"}, {"split": "sbd"}, "r")["eval_split"] == "seg11valid"
    assert describe({"trainval": True}, {"task": "svhn"}, "r")["eval_split"] == "val (also trained on)"
    assert describe({"trainval": False}, {"task": "svhn", "val_is_held_out": True}, "r")["eval_split"] == "val"
    about = describe({}, {}, "run7")
    assert about == {"dataset": None, "eval_split": None, "name": "run7", "synthetic": False}
    assert describe({"synthetic": True}, {}, "r")["synthetic"] is True


def test_a_run_on_marked_data_is_described_as_synthetic(tmp_path):
    from common.plots import run_description
    from common.synthetic import MARKER, is_synthetic, mark_synthetic
    root = tmp_path / "data"
    (root / "train" / "a").mkdir(parents=True)
    assert not is_synthetic(root / "train") and not is_synthetic(None)
    mark_synthetic(root)
    assert (root / MARKER).is_file() and is_synthetic(root) and is_synthetic(root / "train")
    assert run_description({"resolved": {"synthetic": True}}, {}, "r")["synthetic"] is True
    assert run_description({"resolved": {"synthetic": False}}, {"synthetic": False}, "r")["synthetic"] is False


def test_the_evaluated_split_is_the_one_resolved_not_auto():
    from common.plots import run_description
    config = {"data_root": "/d/digits", "method": "piggyback", "eval_split": "auto",
              "resolved": {"eval_split": "test", "arch": "mobilenet_v2"}}
    about = run_description(config, {"split": "test"}, "r")
    assert about["eval_split"] == "test" and about["dataset"] == "digits"
    assert run_description({"eval_split": "auto"}, {"split": "val"}, "r")["eval_split"] == "val"
    assert run_description({"eval_split": "val"}, {}, "r")["eval_split"] == "val"
