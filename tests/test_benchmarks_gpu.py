"""benchmarks.gpu's affine contenders (part A) and the training commands end to end (part D)
on the CPU with tiny sizes: code paths and report rows, not figures."""
import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import all_cores_env
import torch

ROOT = Path(__file__).resolve().parents[1]


def _gpu(args, tmp_path, timeout=300):
    env = all_cores_env(TMPDIR=str(tmp_path))  # code-path checks: no float sums compared
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def _row(text: str, start: str):
    line = next(line for line in text.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_affine_contender_trains_the_scheme_values_at_their_per_layer_rates():
    """"affine eager" is prepared and optimised as the training commands do: masks, head
    and the scheme's values each under their own optimiser; after one Adam step every
    value moved by the scheme's rate times its layer's factor (flat_group), and the
    masks moved too. "binary eager" has no values beside its masks."""
    from benchmarks.gpu_steps import contender
    from benchmarks.workloads import get_workload
    from common.masking import mask_parameters, scheme_parameter_scales, scheme_parameters
    from common.schemes import get_scheme

    torch.manual_seed(0)
    plain = get_workload("wrn28_4").build()
    built = contender(plain, "affine eager", torch.device("cpu"), 2)
    values, scales = scheme_parameters(built.model), scheme_parameter_scales(built.model)
    # one tensor per masked layer, rows a, b, c, d
    assert sorted(built.optimizers) == ["extras", "head", "main"] and len(values) == 28
    assert all(p.shape[0] == 4 and p.numel() == 4 for p in values)
    lr = get_scheme("affine").extras_lr
    assert built.optimizers["extras"].param_groups[0]["lr"] == lr
    # one flat tensor of all the values
    assert [p.numel() for p in built.optimizers["extras"].param_groups[0]["params"]] == [sum(p.numel() for p in values)]
    before = [p.detach().clone() for p in values]
    mask_before = mask_parameters(built.model)[0].detach().clone()
    built.step()
    moved = torch.stack([(p.detach() - b).abs().flatten() for p, b in zip(values, before)])
    # Adam's first step is lr * g / (|g| + eps) = lr in size, times the row's factor
    torch.testing.assert_close(moved, torch.tensor([[lr * f for f in s] for s in scales]), rtol=1e-2, atol=0)
    assert all(s[:2] == (1.0, 1.0) for s in scales)  # a and b: 1
    assert len({s[2] for s in scales}) > 2  # c and d: the weight RMS of each layer
    assert not torch.equal(mask_parameters(built.model)[0], mask_before)
    assert plain.conv1.weight.grad is None  # a copy trains, not the plain network

    binary = contender(plain, "binary eager", torch.device("cpu"), 2)
    assert sorted(binary.optimizers) == ["head", "main"] and scheme_parameters(binary.model) == []
    with pytest.raises(ValueError, match="'affine fast'"):
        contender(plain, "affine fast", torch.device("cpu"), 2)


def test_scheme_ratios_hold_compiled_affine_to_its_goal():
    """The ratio is the median of the per-round ratios; the compiled pair is the only
    check (<= 1.05); a compiled pair asked for but not timed is a check marked not measured."""
    from benchmarks.gpu_steps import scheme_ratios
    from benchmarks.harness import Section

    section = Section("6. GPU")
    times = {"affine eager": [2.0, 3.0, 2.2], "binary eager": [1.0, 2.0, 2.0],
             "affine compiled": [1.04, 1.2, 0.9], "binary compiled": [1.0, 1.0, 1.0]}
    rows = scheme_ratios(section, 32, times, list(times))
    assert rows == [["32", "eager", "14.5", "16", "1.500"], ["32", "compiled", "30.8", "32", "1.040"]]
    (check,) = section.checks
    assert (check.name, check.value, check.goal, check.passed) == (
        "affine compiled / binary compiled step time, batch 32", "1.040", "<= 1.05", True)
    times["affine compiled"] = [1.2, 1.1, 1.3]
    section = Section("6. GPU")
    scheme_ratios(section, 128, times, list(times))
    assert section.checks[0].passed is False and section.checks[0].value == "1.200"
    section = Section("6. GPU")
    assert scheme_ratios(section, 2, {"affine eager": [1.0], "binary eager": [1.0]},
                         ["affine eager", "binary eager", "affine compiled", "binary compiled"]) \
        == [["2", "eager", "2", "2", "1.000"]]
    assert section.checks[0].passed is None and section.checks[0].value.startswith("not measured")


@pytest.mark.slow
def test_gpu_benchmark_part_a_reports_affine_against_binary(tmp_path):
    out = tmp_path / "A.md"
    proc = _gpu(["--quick", "--batches", "2", "--out", str(out), "--only", "piggyback eager", "binary eager",
                 "affine eager", "binary compiled", "affine compiled"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    for name in ("piggyback eager", "binary eager", "affine eager"):
        assert _number(_row(text, f"| 2 | {name} |")[2]) > 0
    batch, mode, affine, binary, ratio = _row(text, "| 2 | eager |")
    assert _number(affine) > 0 and _number(binary) > 0 and float(ratio) > 0
    assert "| 6. GPU | affine compiled / binary compiled step time, batch 2 | not measured" in text
    assert "| 2 | affine compiled |" not in text  # compiled contenders run on a CUDA device only


@pytest.mark.slow
def test_training_runs_parse_and_malformed_ones_are_refused(tmp_path):
    from benchmarks.gpu_training import TRAINING_RUNS, parse_training_run

    assert [parse_training_run(r).label for r in TRAINING_RUNS] == [
        "classification, piggyback binary", "classification, piggyback affine", "segmentation, piggyback binary",
        "segmentation, piggyback affine", "classification, finetune"]
    run = parse_training_run("segmentation:piggyback:affine")
    assert (run.pipeline, run.method, run.scheme, run.flags) == (
        "segmentation", "piggyback", "affine", ["--method", "piggyback", "--scheme", "affine"])
    assert parse_training_run("classification:finetune").flags == ["--method", "finetune"]
    for spec in ("classification", "classification:finetune:affine", "detection:piggyback",
                 "classification:piggyback:quaternary", "segmentation:scratch", "classification:piggyback:affine:x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"training run '{spec}'"):
            parse_training_run(spec)
    for flags, named in ((["--training-runs", "classification:piggyback:quaternary"], "quaternary"),
                         (["--seg-sides", "500", "320"], "--seg-sides 500 320"),
                         (["--cls-epochs", "0"], "--cls-epochs"),
                         (["--only", "affine fast"], "affine fast")):
        bad = _gpu(["--no-steps", *flags], tmp_path, timeout=120)
        assert bad.returncode == 2 and named in bad.stderr, bad.stderr
    afile = tmp_path / "afile"
    afile.write_text("")
    bad = _gpu(["--no-steps", "--training-e2e", str(afile)], tmp_path, timeout=120)
    assert bad.returncode == 2 and str(afile) in bad.stderr


def test_gpu_check_names_only_known_contenders_and_refuses_an_unknown_part(tmp_path):
    """Every contender the script's parts time exists (a typo would cost a GPU call)."""
    from benchmarks.gpu_steps import CONTENDERS

    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    calls = [shlex.split(c) for c in script.replace("\\\n", " ").splitlines() if "-m benchmarks.gpu" in c]
    assert len(calls) == 3
    named = []
    for words in calls:
        if "--only" in words:
            rest = words[words.index("--only") + 1:]
            named += [w for w in rest[:next((i for i, w in enumerate(rest) if w.startswith("--")), len(rest))]]
    assert {"affine eager", "affine compiled", "affine CUDA graphs", "binary compiled"} <= set(named)
    assert set(named) <= set(CONTENDERS)
    affine = next(words for words in calls if "--training-e2e" in words)
    assert {"affine compiled", "piggyback CUDA graphs"} <= set(affine) and "--no-steps" not in affine
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "o"), "affin"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'affin'" in bad.stderr and not (tmp_path / "o").exists()


TINY = ["--cls-arch", "resnet18", "--cls-size", "32", "--cls-images", "40", "--cls-epochs", "2",
        "--seg-arch", "vgg-tiny", "--seg-images", "6", "--seg-sides", "48", "64", "--seg-epochs", "1"]


@pytest.mark.slow
def test_gpu_benchmark_part_d_runs_classification_train(tmp_path):
    """Part D on the CPU: it writes the tree and the weight file, runs classification.train
    once per run, reads each run's rates from its own log, and reports the ratios."""
    out, tree = tmp_path / "D.md", tmp_path / "tree"
    proc = _gpu(["--no-steps", "--out", str(out), "--training-e2e", str(tree), *TINY, "--training-runs",
                 "classification:piggyback", "classification:piggyback:affine", "classification:finetune"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    for label in ("classification, piggyback binary", "classification, piggyback affine", "classification, finetune"):
        row = _row(text, f"| {label} |")
        rate, per_epoch, ms, step_rate = _number(row[1]), row[2].split(" / "), float(row[3]), _number(row[4])
        assert rate > 0 and len(per_epoch) == 2 and ms > 0 and step_rate > 0
        assert rate == _number(per_epoch[1])  # the epochs after the first
    for pair in ("affine / binary", "piggyback / finetune"):
        epoch_ratio, step_ratio = (float(x) for x in _row(text, f"| classification | {pair} |")[2:])
        assert epoch_ratio > 0 and step_ratio > 0
    assert "| segmentation |" not in text
    runs = tmp_path / "piggyback-training-e2e"
    config = json.loads((runs / "classification_piggyback_affine" / "config.json").read_text())
    assert (config["method"], config["scheme"], config["arch"], config["size"], config["epochs"]) == (
        "piggyback", "affine", "resnet18", 32, 2)
    resolved = config["resolved"]
    assert resolved["synthetic"] is True and resolved["train_images"] == 40
    assert resolved["backbone"] == str(tree / "classification-resnet18-random.pth")
    assert json.loads((runs / "classification_finetune" / "config.json").read_text())["method"] == "finetune"
    written = tree / "imagefolder-40-37px"
    assert (written / "SYNTHETIC.txt").is_file() and len(list((written / "train").glob("*/*.jpg"))) == 40
    assert (tree / "classification-resnet18-random.pth").is_file()


@pytest.mark.slow
def test_gpu_benchmark_part_d_runs_segmentation_train_and_reports_failures(tmp_path):
    from benchmarks.gpu_training import TrainingSetup, parse_training_run, training_end_to_end
    from benchmarks.harness import render_markdown

    out, tree = tmp_path / "D.md", tmp_path / "tree"
    proc = _gpu(["--no-steps", "--out", str(out), "--training-e2e", str(tree), *TINY, "--training-runs",
                 "segmentation:piggyback", "segmentation:piggyback:affine"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    for label in ("segmentation, piggyback binary", "segmentation, piggyback affine"):
        row = _row(text, f"| {label} |")
        assert _number(row[1]) > 0 and float(row[3]) > 0 and row[2] == row[1]  # one epoch
    epoch_ratio, step_ratio = (float(x) for x in _row(text, "| segmentation | affine / binary |")[2:])
    assert epoch_ratio > 0 and step_ratio > 0
    config = json.loads((tmp_path / "piggyback-training-e2e" / "segmentation_piggyback_affine" / "config.json")
                        .read_text())
    assert (config["scheme"], config["arch"], config["split"]) == ("affine", "vgg-tiny", "sbd")
    assert (tree / "pascal-6-48-64px" / "seg11valid.txt").is_file()

    # a run that fails is a row and a note, and the report is rewritten after every run
    reports = []
    setup = TrainingSetup(seg_arch="vgg-tiny", seg_images=6, seg_sides=(48, 64), seg_epochs=1)
    section = training_end_to_end(tree, tmp_path / "runs", [parse_training_run("segmentation:piggyback:affine")] * 2,
                                  setup, extra=["--device", "cpu", "--no-such-flag"], log=lambda *a: None,
                                  report=lambda s: reports.append(render_markdown([s], {}, title="t")))
    assert len(reports) == 2 and "| segmentation, piggyback affine | failed |" in reports[0]
    assert "--no-such-flag" in section.notes[0] and "failed" in section.notes[0]


def test_synthetic_image_folder_layout_and_refusals(tmp_path):
    from PIL import Image

    from classification.synthetic import write_synthetic_image_folder
    from common.errors import UsageError

    root = write_synthetic_image_folder(tmp_path / "t", classes=3, train_per_class=4, test_per_class=2, side=20,
                                        image_format="png")
    assert sorted(p.name for p in (root / "train").iterdir()) == ["class00", "class01", "class02"]
    assert len(list(root.glob("train/*/*.png"))) == 12 and len(list(root.glob("test/*/*.png"))) == 6
    assert Image.open(next(root.glob("test/class01/*.png"))).size == (20, 20)
    assert (root / "SYNTHETIC.txt").is_file()
    with pytest.raises(UsageError, match=str(root)):
        write_synthetic_image_folder(root)
    with pytest.raises(UsageError, match="'gif'"):
        write_synthetic_image_folder(tmp_path / "u", image_format="gif")
    with pytest.raises(UsageError, match="side must be >= 1, got 0"):
        write_synthetic_image_folder(tmp_path / "v", side=0)
