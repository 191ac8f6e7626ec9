"""End-to-end runs of segmentation.train / evaluate / demo as a user runs them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from common.maskfile import MaskFileError, read_mask_file, read_mask_metadata
from common.metrics import ConfusionMatrix
from segmentation import evaluate as evaluate_cli
from segmentation import train as train_cli
from segmentation.data import read_id_list, read_image, read_voc_label
from segmentation.demo import write_synthetic_backbone
from segmentation.model import bilinear_kernel
from common.config import read_run_config
from common.errors import UsageError, ResumeError
from common.methods import load_task
from segmentation.runs import build_run_model
from segmentation.synthetic import write_synthetic_pascal
from segmentation.weights import resolve_backbone

pytestmark = pytest.mark.slow  # end-to-end commands: left out of the fast subset

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = ("pixel_acc", "mean_acc", "mean_iou", "fw_iou")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def _run(args, **env):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(autouse=True)
def one_thread():
    # Subprocesses run with OMP_NUM_THREADS=1; the same thread count here keeps floating-point
    # reductions in the same order (the resume test compares against a subprocess run) and
    # avoids oversubscribing small CI machines.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    root = tmp_path_factory.mktemp("pascal")
    layout = write_synthetic_pascal(root, n_sbd_train=6, n_sbd_val=2, n_voc_train=3, n_voc_val=4,
                                    n_overlap=1, size=(33, 48), seed=2)
    backbone = write_synthetic_backbone(root / "vgg-tiny.pth", seed=3)
    return layout, backbone


def _argv(pascal, out, *extra):
    layout, backbone = pascal
    return ["--data-root", str(layout.root), "--val-list", str(layout.seg11valid), "--arch", "vgg-tiny",
            "--backbone", str(backbone), "--batch-size", "2", "--workers", "0", "--device", "cpu",
            "--out", str(out), "--lr", "1e-2", "--head-optimizer", "adam", "--head-lr", "1e-2", *extra]


def _train_in_process(argv):
    return train_cli.main(train_cli.parse_config(argv))


@pytest.fixture(scope="module")
def trained_run(pascal, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sbd"
    proc = _run(["-m", "segmentation.train", *_argv(pascal, out, "--epochs", "2")])
    assert "eta" in proc.stdout and "mean IoU" in proc.stdout
    return out


def test_train_writes_a_complete_run_folder(trained_run, pascal):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "log.jsonl", "checkpoint.pt", "masks.safetensors", "metrics.json"} <= names
    config = read_run_config(trained_run)
    assert config["method"] == "piggyback" and config["backbone_kind"] == "torchvision"
    assert config["input_convention"] == "torchvision" and "git_commit" in config
    log = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(0 <= r["mean_iou"] <= 1 for r in log)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert all(0 <= metrics[k] <= 1 for k in METRIC_KEYS)
    assert len(metrics["per_class_iou"]) == 21 and "background" in metrics["per_class_iou"]
    assert metrics["eval_images"] == len(pascal[0].ids["seg11valid"])
    assert metrics["storage"]["mask_mb"] > 0 and metrics["storage"]["task_mb"] < metrics["storage"]["full_fcn_mb"]
    # The mask file loads onto a fresh copy of the backbone file: its fingerprint check
    # proves the frozen weights came out of training bit-identical.
    masks, state, meta = read_mask_file(trained_run / "masks.safetensors")[:3]
    assert set(state) == {"score_fr.weight", "score_fr.bias", "upscore.weight"} and meta["method"] == "piggyback"
    assert {"fc6", "fc7", "features.0"} <= set(masks)
    model = build_run_model("vgg-tiny", "piggyback", resolve_backbone("vgg-tiny", backbone=str(pascal[1])))
    assert load_task(trained_run, model)["method"] == "piggyback"
    assert model.score_fr.weight.abs().sum() > 0


def test_evaluate_reproduces_the_metrics_and_draws_pictures(trained_run, tmp_path):
    out = tmp_path / "eval.json"
    proc = _run(["-m", "segmentation.evaluate", str(trained_run), "--workers", "0", "--device", "cpu",
                 "--output", str(out), "--pictures", "2", "--pictures-dir", str(tmp_path / "pics")])
    assert "full FCN" in proc.stdout
    evaluated, trained = json.loads(out.read_text()), json.loads((trained_run / "metrics.json").read_text())
    assert evaluated["pixels"] == trained["pixels"]
    assert all(evaluated[k] == trained[k] for k in METRIC_KEYS)
    predictions = sorted((tmp_path / "pics").glob("*_prediction.png"))
    assert len(predictions) == 2 and len(list((tmp_path / "pics").glob("*_overview.png"))) == 2
    image_id = predictions[0].name[:-len("_prediction.png")]
    config = json.loads((trained_run / "config.json").read_text())
    image = read_image(Path(config["data_root"]) / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{image_id}.jpg")
    assert read_voc_label(predictions[0]).shape == image.shape[:2]
    # the overview: three panels of at least the image's own size, readable by everyone
    overview = tmp_path / "pics" / f"{image_id}_overview.png"
    for picture in (overview, predictions[0]):
        assert (picture.stat().st_mode & 0o777) == 0o644
    with Image.open(overview) as img:
        assert img.size[0] >= 3 * image.shape[1] and img.size[1] >= image.shape[0] + 40


def test_resumed_run_equals_an_uninterrupted_one(pascal, trained_run, tmp_path):
    _train_in_process(_argv(pascal, tmp_path / "split", "--epochs", "1"))
    resumed = _train_in_process(_argv(pascal, tmp_path / "split", "--epochs", "2"))
    full = json.loads((trained_run / "metrics.json").read_text())
    assert all(resumed[k] == full[k] for k in METRIC_KEYS)
    a, _, _ = read_mask_file(trained_run / "masks.safetensors")[:3]
    b, _, _ = read_mask_file(tmp_path / "split" / "masks.safetensors")[:3]
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(x)["train_loss"] for x in (d / "log.jsonl").read_text().splitlines()]
              for d in (trained_run, tmp_path / "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    with pytest.raises(ResumeError, match="head_lr"):
        _train_in_process(_argv(pascal, tmp_path / "split", "--epochs", "3", "--head-lr", "1e-3"))


def test_finetune_saves_the_whole_network(pascal, tmp_path):
    result = _train_in_process(_argv(pascal, tmp_path / "ft", "--epochs", "1", "--method", "finetune",
                                     "--optimizer", "sgd", "--lr", "1e-3", "--learn-upsample"))
    assert (tmp_path / "ft" / "weights.safetensors").is_file() and result["sparsity"] is None
    assert result["storage"]["task_mb"] == result["storage"]["full_fcn_mb"]
    saved = load_file(str(tmp_path / "ft" / "weights.safetensors"))
    assert not torch.equal(saved["upscore.weight"], bilinear_kernel(21, 64))  # --learn-upsample trained it
    evaluated = evaluate_cli.main(evaluate_cli.SegEvaluateConfig.from_cli([str(tmp_path / "ft"), "--workers", "0", "--device", "cpu"]))
    assert all(evaluated[k] == result[k] for k in METRIC_KEYS)


def test_caffe_weights_mask_options_and_amp(pascal, tmp_path):
    """Caffe layer names and BGR input, non-default mask settings, bf16 autocast on the CPU."""
    caffe_names = {"features.0": "conv1_1", "features.3": "conv2_1", "features.6": "conv3_1",
                   "features.9": "conv4_1", "features.12": "conv5_1", "classifier.0": "fc6",
                   "classifier.3": "fc7", "classifier.6": "fc8"}
    state = torch.load(pascal[1], weights_only=True)
    caffe = {f"{caffe_names[k.rpartition('.')[0]]}.{k.rpartition('.')[2]}": v for k, v in state.items()}
    torch.save(caffe, tmp_path / "caffe.pth")
    argv = [a for a in _argv(pascal, tmp_path / "c", "--epochs", "1") if a not in ("--backbone", str(pascal[1]))]
    _train_in_process(argv + ["--caffe-weights", str(tmp_path / "caffe.pth"), "--threshold", "4e-3",
                              "--mask-init", "uniform", "--mask-scale", "2e-3", "--amp", "on"])
    config = read_run_config(tmp_path / "c")
    assert config["input_convention"] == "caffe" and config["backbone_kind"] == "caffe" and config["amp"] is True
    meta = read_mask_metadata(tmp_path / "c" / "masks.safetensors")
    assert meta["threshold"] == 4e-3 and meta["input_convention"] == "caffe"
    masks, _, _ = read_mask_file(tmp_path / "c" / "masks.safetensors")[:3]
    assert 0.2 < float(sum((m == 0).sum() for m in masks.values()) / sum(m.numel() for m in masks.values())) < 0.8


def test_evaluate_options(pascal, trained_run, tmp_path, monkeypatch):
    layout, backbone = pascal
    moved = tmp_path / "moved.pth"
    moved.write_bytes(backbone.read_bytes())
    weights = tmp_path / "copy.safetensors"
    weights.write_bytes((trained_run / "masks.safetensors").read_bytes())
    result = evaluate_cli.main(evaluate_cli.SegEvaluateConfig.from_cli((
        [str(trained_run), "--split", "voc", "--data-root", str(layout.root), "--backbone", str(moved),
         "--weights", str(weights), "--output", str(tmp_path / "voc.json"), "--workers", "0", "--amp", "off"])))
    assert result["split"] == "voc" and result["eval_images"] == len(layout.ids["voc_val"])
    assert json.loads((tmp_path / "voc.json").read_text())["mean_iou"] == result["mean_iou"]
    # --compile on: the FCN is compiled for varying image sizes, the metrics do not change
    asked = []
    monkeypatch.setattr(evaluate_cli, "compile_for_eval", lambda m, choice, **kw: (asked.append((choice, kw)), m)[1])
    again = evaluate_cli.main(evaluate_cli.SegEvaluateConfig.from_cli((
        [str(trained_run), "--split", "voc", "--data-root", str(layout.root), "--backbone", str(moved),
         "--weights", str(weights), "--output", str(tmp_path / "voc2.json"), "--workers", "0", "--amp", "off",
         "--compile", "on"])))
    assert asked == [("on", {"dynamic": True})] and again["mean_iou"] == result["mean_iou"]
    monkeypatch.undo()
    other = tmp_path / "other.pth"
    write_synthetic_backbone(other, seed=99)
    with pytest.raises(MaskFileError, match="another backbone"):
        evaluate_cli.main(evaluate_cli.SegEvaluateConfig.from_cli([str(trained_run), "--backbone", str(other), "--workers", "0"]))
    with pytest.raises(UsageError, match="--pictures-dir needs --pictures"):
        evaluate_cli.SegEvaluateConfig.from_cli([str(trained_run), "--pictures-dir", "x"])


def test_torchrun_two_processes(pascal, tmp_path):
    out = tmp_path / "ddp"
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "segmentation.train",
          *_argv(pascal, out, "--epochs", "1")])
    trained = json.loads((out / "metrics.json").read_text())
    assert read_run_config(out)["world_size"] == 2
    single = evaluate_cli.main(evaluate_cli.SegEvaluateConfig.from_cli([str(out), "--workers", "0", "--device", "cpu"]))
    # Each rank saw half of the images: only the reduced matrix gives the whole-set numbers.
    assert single["pixels"] == trained["pixels"] and all(single[k] == trained[k] for k in METRIC_KEYS)


def test_bad_input_gives_clear_errors(pascal, tmp_path, monkeypatch, capsys):
    layout, backbone = pascal
    with pytest.raises(SystemExit, match="SBD dataset"):
        train_cli.cli(_argv(pascal, tmp_path / "a", "--data-root", str(tmp_path / "nothing")))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit, match="vgg16-397923af.pth"):
        train_cli.cli(["--data-root", str(layout.root), "--out", str(tmp_path / "b")])
    for argv in (["--random-init", "--backbone", str(backbone)], ["--split", "voc", "--val-list", "x.txt"],
                 ["--method", "finetune", "--threshold", "0.1"], ["--lr", "-1"],
                 ["--momentum", "-0.5"], ["--method", "feature"]):
        with pytest.raises(SystemExit) as err:
            train_cli.cli(["--data-root", str(layout.root), *argv])
        assert err.value.code == 2
    assert "exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="config.json"):
        evaluate_cli.cli([str(tmp_path)])


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    # Fewer images and epochs than the demo's defaults (12 x 64), enough to learn something.
    proc = _run(["-m", "segmentation.demo", "--out", str(out), "--epochs", "5", "--train-images", "32"])
    assert "SYNTHETIC" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "run" / "config.json").read_text())["resolved"]["synthetic"] is True
    assert metrics["synthetic_data"] and metrics["synthetic_backbone"] and "synthetic" in metrics["notice"]
    assert all(0 <= metrics[k] <= 1 for k in METRIC_KEYS) and len(metrics["train_loss_per_epoch"]) == 5
    assert len(list((out / "run" / "pictures").glob("*_overview.png"))) == 4
    assert sorted(metrics["plots"]) == sorted(str(out / "run" / n) for n in ("curves.png", "sparsity.png"))
    assert np.isfinite(metrics["storage"]["mask_mb"])
    # The model learnt more than the class prior: predicting background everywhere on the
    # same evaluation labels scores a lower mean IoU and pixel accuracy.
    voc = out / "data" / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    labels = [torch.from_numpy(read_voc_label(voc / f"{i}.png").astype(np.int64))
              for i in read_id_list(out / "data" / "seg11valid.txt")]
    assert len(labels) == metrics["eval_images"]
    background_only = ConfusionMatrix(21, ignore_index=255)
    for label in labels:
        background_only.update(label, torch.zeros_like(label))
    baseline = background_only.compute()
    assert metrics["mean_iou"] > baseline["mean_iou"] + 0.05, (metrics["mean_iou"], baseline["mean_iou"])
    assert metrics["pixel_acc"] > baseline["pixel_acc"], (metrics["pixel_acc"], baseline["pixel_acc"])
    assert max(v for k, v in metrics["per_class_iou"].items() if k != "background" and v is not None) > 0.2


def test_train_with_the_affine_scheme_stores_its_scalars_and_counts_them(pascal, tmp_path):
    out = tmp_path / "affine"
    done = _train_in_process(_argv(pascal, out, "--epochs", "1", "--scheme", "affine"))
    contents = read_mask_file(out / "masks.safetensors")
    assert contents.meta["scheme"] == "affine" and set(contents.extras) == set(contents.masks)
    scalars = sum(t.numel() for layer in contents.extras.values() for t in layer.values())
    assert done["storage"]["scheme_params"] == scalars == 4 * len(contents.masks)
    model = build_run_model("vgg-tiny", "piggyback", resolve_backbone("vgg-tiny", backbone=str(pascal[1])))
    load_task(out, model)  # switches the converted backbone to the file's scheme
    layer = model.get_submodule("fc6")
    assert layer.scheme.name == "affine"
    assert torch.equal(layer.mask_abcd.detach().cpu(), contents.extras["fc6"]["abcd"])
