"""decathlon.demo end to end, as a new user runs it (reduced sizes to stay fast)."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from decathlon.data import DecathlonDataset
from common.errors import UsageError
from decathlon.demo import DemoConfig
from decathlon.score import load_results, load_test_labels, score_results, validate_results
from decathlon.submit import task_test_set
from decathlon.tasks import TASK_NAMES, get_task

pytestmark = pytest.mark.slow  # end-to-end commands: left out of the fast subset

ROOT = Path(__file__).resolve().parents[1]


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "decathlon.demo", "--out", str(out), "--classes", "2",
         "--source-classes", "3", "--train-per-class", "4", "--pretrain-epochs", "1",
         "--epochs", "1", "--arch", "wrn10_1", "--seed", "3", "--batch-size", "8",
         "--mask-lr", "2e-3", "--device", "cpu", "--workers", "0", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("SYNTHETIC") >= 2 and "with 1 CPU thread(s)" in proc.stdout
    assert "| imagenet12 |" in proc.stdout and "decathlon score" in proc.stdout

    # the data is laid out like decathlon-1.0, ids with the real prefixes
    data = out / "data"
    for task in TASK_NAMES:
        for part in ("train", "val", "test_stripped"):
            assert (data / "annotations" / f"{task}_{part}.json").is_file()
    ped = json.loads((data / "annotations" / "daimlerpedcls_test_stripped.json").read_text())
    assert {(im["width"], im["height"]) for im in ped["images"]} == {(72, 144)}
    omni = json.loads((data / "annotations" / "omniglot_train.json").read_text())
    assert cv2.imread(str(data / omni["images"][0]["file_name"]), cv2.IMREAD_UNCHANGED).ndim == 2

    # the submission covers every test image once with the task's own category ids
    sub = out / "submission"
    pairs = load_results(sub / "results.json")
    test_sets = [task_test_set(DecathlonDataset(data, t, "test")) for t in TASK_NAMES]
    validate_results(pairs, test_sets)
    assert {i // 10_000_000 for i, _ in pairs} == {get_task(t).prefix // 10_000_000 for t in TASK_NAMES}
    assert (sub / "results.zip").is_file() and (sub / "summary.md").is_file()

    summary = json.loads((sub / "summary.json").read_text())
    # synthetic data is marked so in every run's record and in the submission (tasks.png, summary.md)
    assert summary["synthetic"] is True and "**Synthetic data**" in (sub / "summary.md").read_text()
    for run in [out / "pretrain", *(out / "runs" / t for t in ("svhn", "dtd"))]:
        assert json.loads((run / "config.json").read_text())["resolved"]["synthetic"] is True
    scored = score_results(pairs, load_test_labels(str(out / "labels")))
    assert summary["score_source"] == "test labels"
    assert summary["score"] == pytest.approx(scored["score"])
    assert summary["parameter_ratio"] > summary["parameter_ratio_masks_only"] > 1.0
    assert summary["backbone"]["arch"] == "wrn10_1"
    assert all(summary["tasks"][t]["status"] == "submitted" for t in TASK_NAMES)
    config = json.loads((out / "runs" / "svhn" / "config.json").read_text())
    assert (config["seed"], config["batch_size"], config["lr"], config["epochs"]) == (3, 8, 2e-3, 1)


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--classes", "1"], ["--workers", "-1"], ["--threads", "0"],
                                  ["--mask-lr", "0"], ["--device", "gpu"]])
def test_bad_flags_refused(argv):
    with pytest.raises(UsageError):
        DemoConfig.from_cli(argv)
