"""The decathlon score formula, the submission validator and offline scoring against the
real labelled test annotations in ``../shared/data/decathlon/labels_test``."""
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import require_real_labels
from decathlon.score import (EMAX, SCORED_TASKS, SubmissionError, TaskTestSet, decathlon_score,
                             load_accuracies, load_test_labels, parse_results, score_results,
                             task_points, validate_results)

ROOT = Path(__file__).resolve().parents[1]

ORDER = ("imagenet12", "aircraft", "cifar100", "daimlerpedcls", "dtd", "gtsrb",
         "vgg-flowers", "omniglot", "svhn", "ucf101")
# Published rows (paper Table 8 and the challenge's baselines): method -> (accuracies in
# ORDER, published score). The published accuracies are rounded, hence the tolerance.
PUBLISHED = {
    "scratch": ((59.87, 57.1, 75.73, 91.2, 37.77, 96.55, 56.3, 88.74, 96.63, 43.27), 1625),
    "feature": ((59.67, 23.31, 63.11, 80.33, 45.37, 68.16, 73.69, 58.79, 43.54, 26.8), 544),
    "finetune": ((59.87, 60.34, 82.12, 92.82, 55.53, 97.53, 81.41, 87.69, 96.55, 51.2), 2500),
    "res-adapt": ((59.67, 56.68, 81.2, 93.88, 50.85, 97.05, 66.24, 89.62, 96.13, 47.45), 2118),
    "res-adapt-j": ((59.23, 63.73, 81.31, 93.3, 57.02, 97.47, 83.43, 89.82, 96.17, 50.28), 2643),
    "dan": ((57.74, 64.12, 80.07, 91.3, 56.54, 98.46, 86.05, 89.67, 96.77, 49.38), 2851),
    "piggyback": ((57.69, 65.29, 79.87, 96.99, 57.45, 97.27, 79.09, 87.63, 97.24, 47.48), 2838),
}
PUBLISHED_EMAX = dict(zip(ORDER, (0.8026, 0.7932, 0.3576, 0.1436, 0.8894, 0.0494, 0.3718,
                                  0.2462, 0.0690, 0.9760)))


def _points(task, top1):
    """Independent restatement of the formula, for checking computed rows."""
    err, emax = 1 - top1 / 100, PUBLISHED_EMAX[task]
    return 1000 * (max(0.0, emax - err) / emax) ** 2


@pytest.fixture(scope="module")
def labels():
    return load_test_labels(str(require_real_labels().parent))


def test_emax_matches_published_constants():
    assert set(SCORED_TASKS) == set(ORDER)
    for task, emax in PUBLISHED_EMAX.items():
        assert EMAX[task] == pytest.approx(emax, abs=1e-9)


@pytest.mark.parametrize("method", sorted(PUBLISHED))
def test_published_rows_reproduced(method):
    accs, published = PUBLISHED[method]
    result = decathlon_score(dict(zip(ORDER, accs)))
    assert abs(result["score"] - published) <= 3.0, (method, result["score"])
    assert result["unscored_tasks"] == []
    assert sum(result["points"].values()) == pytest.approx(result["score"])


def test_task_points_shape():
    for task in ORDER:
        assert task_points(task, 100.0) == pytest.approx(1000.0)
        # the Finetune baseline's error is Emax / 2, worth a quarter of the points
        assert task_points(task, 100 * (1 - EMAX[task] / 2)) == pytest.approx(250.0)
        assert task_points(task, 0.0) == 0.0
    # below the 2x-baseline error every task earns nothing, and points rise with accuracy
    assert task_points("gtsrb", 90.0) == 0.0
    assert task_points("svhn", 97.0) < task_points("svhn", 98.0) < task_points("svhn", 99.0)


def test_missing_task_scores_zero():
    accs = dict(zip(ORDER, PUBLISHED["piggyback"][0]))
    full = decathlon_score(accs)
    del accs["gtsrb"]
    partial = decathlon_score(accs)
    assert partial["unscored_tasks"] == ["gtsrb"]
    assert partial["points"]["gtsrb"] == 0.0
    assert partial["score"] == pytest.approx(full["score"] - full["points"]["gtsrb"])


@pytest.mark.parametrize("bad", [{"nope": 50.0}, {"svhn": 101.0}, {"svhn": -1}, {"svhn": "90"},
                                 {"svhn": float("nan")}])
def test_bad_accuracies_refused(bad):
    with pytest.raises(SubmissionError):
        decathlon_score(bad)


def _submission(labels, pick):
    return [{"image_id": i, "category_id": pick(task, i, c)}
            for task, truth in labels.items() for i, c in truth.items()]


def test_real_labels_schema(labels):
    assert set(labels) == {"daimlerpedcls", "dtd", "vgg-flowers"}
    assert len(labels["dtd"]) == 1880 and len(labels["vgg-flowers"]) == 6149
    assert len(labels["daimlerpedcls"]) == 19600


def test_perfect_submission_scores_full_points(labels):
    pairs = parse_results(_submission(labels, lambda t, i, c: c))
    result = score_results(pairs, labels)
    for task in labels:
        assert result["top1"][task] == 100.0
        assert result["points"][task] == pytest.approx(1000.0)
    assert result["score"] == pytest.approx(3000.0)
    assert set(result["unscored_tasks"]) == set(ORDER) - set(labels)


def test_constant_submission_scores_the_majority_rate(labels):
    # one constant category per task: accuracy is that category's share of the test set
    constant = {t: Counter(truth.values()).most_common(1)[0][0] for t, truth in labels.items()}
    pairs = parse_results(_submission(labels, lambda t, i, c: constant[t]))
    result = score_results(pairs, labels)
    for task, truth in labels.items():
        share = 100.0 * sum(c == constant[task] for c in truth.values()) / len(truth)
        assert result["top1"][task] == pytest.approx(share)
        assert result["points"][task] == pytest.approx(_points(task, share))
    # daimlerpedcls is 2-class: the majority class alone beats nothing but is not zero
    assert result["top1"]["daimlerpedcls"] > 50.0
    assert result["points"]["dtd"] == 0.0


def test_missing_predictions_count_as_errors(labels):
    truth = labels["dtd"]
    kept = list(truth.items())[: len(truth) // 2]
    pairs = [(i, c) for i, c in kept] + [(999, 1)]
    result = score_results(pairs, {"dtd": truth})
    assert result["counts"]["dtd"] == {"images": 1880, "predicted": 940, "correct": 940}
    assert result["top1"]["dtd"] == pytest.approx(50.0)
    assert result["ignored_predictions"] == 1
    with pytest.raises(SubmissionError, match="more than once"):
        score_results(pairs + [kept[0]], {"dtd": truth})


def _test_sets():
    return [TaskTestSet("svhn", frozenset({80000011, 80000012, 80000013}),
                    frozenset({80000001, 80000002})),
            TaskTestSet("dtd", frozenset({40000011, 40000012}), frozenset({40000001}))]


def test_validator_accepts_complete_submission():
    pairs = [(80000011, 80000001), (80000012, 80000002), (80000013, 80000001),
             (40000011, 40000001), (40000012, 40000001)]
    validate_results(pairs, _test_sets())


@pytest.mark.parametrize("pairs, message", [
    ([(80000011, 80000001), (80000012, 80000002), (40000011, 40000001), (40000012, 40000001)],
     "svhn: 1 of 3 test images have no prediction: 80000013"),
    ([(80000011, 80000001), (80000012, 80000002), (80000013, 80000001), (80000013, 80000001),
      (40000011, 40000001), (40000012, 40000001)], "predicted more than once: 80000013"),
    ([(80000011, 80000001), (80000012, 80000002), (80000013, 80000001), (40000011, 40000001),
      (40000012, 40000001), (50000001, 50000001)], "belong to no test set: 50000001"),
    ([(80000011, 40000001), (80000012, 80000002), (80000013, 80000001), (40000011, 40000001),
      (40000012, 40000001)], "svhn: 1 predictions have a category id"),
])
def test_validator_rejects(pairs, message):
    with pytest.raises(SubmissionError, match=message):
        validate_results(pairs, _test_sets())


def test_validator_allows_named_missing_tasks_only_when_wholly_absent():
    svhn_only = [(80000011, 80000001), (80000012, 80000002), (80000013, 80000001)]
    validate_results(svhn_only, _test_sets(), allow_missing_tasks=["dtd"])
    with pytest.raises(SubmissionError, match="dtd: 2 of 2"):
        validate_results(svhn_only, _test_sets())
    with pytest.raises(SubmissionError, match="dtd: 1 of 2"):
        validate_results(svhn_only + [(40000011, 40000001)], _test_sets(),
                         allow_missing_tasks=["dtd"])


@pytest.mark.parametrize("obj", [{"image_id": 1, "category_id": 2}, [{"image_id": 1}],
                                 [{"image_id": "1", "category_id": 2}],
                                 [{"image_id": True, "category_id": 2}]])
def test_parse_results_rejects_bad_shapes(obj):
    with pytest.raises(SubmissionError):
        parse_results(obj)


def _run(*argv):
    return subprocess.run([sys.executable, "-m", "decathlon.score", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_accuracies_and_results(tmp_path, labels):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps(dict(zip(ORDER, PUBLISHED["piggyback"][0]))))
    proc = _run("--accuracies", str(acc))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert abs(out["score"] - 2838) <= 3 and set(out["points"]) == set(ORDER)

    results = tmp_path / "results.json"
    results.write_text(json.dumps(_submission(labels, lambda t, i, c: c)))
    proc = _run("--results", str(results), "--labels", str(require_real_labels().parent))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["score"] == pytest.approx(3000.0)
    assert out["top1"] == {"daimlerpedcls": 100.0, "dtd": 100.0, "vgg-flowers": 100.0}
    assert "ignored" not in proc.stderr
    extra = json.loads(results.read_text()) + [{"image_id": 999999999, "category_id": 1}]
    results.write_text(json.dumps(extra))
    proc = _run("--results", str(results), "--labels", str(require_real_labels().parent))
    assert proc.returncode == 0 and "1 prediction(s)" in proc.stderr and "ignored" in proc.stderr


@pytest.mark.slow
def test_cli_bad_input_names_the_file(tmp_path):
    bad = tmp_path / "acc.json"
    bad.write_text(json.dumps({"svhm": 97.0}))
    proc = _run("--accuracies", str(bad))
    assert proc.returncode == 2
    assert str(bad) in proc.stderr and "svhm" in proc.stderr
    proc = _run("--results", str(bad))
    assert proc.returncode == 2 and "--labels" in proc.stderr


def test_cli_refuses_fractions_for_percentages(tmp_path):
    fractions = tmp_path / "acc.json"
    fractions.write_text(json.dumps({"svhn": 0.9724, "dtd": 0.5745, "gtsrb": 0.9727}))
    proc = _run("--accuracies", str(fractions))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    message = lines[0]
    assert str(fractions) in message and "gtsrb: 0.9727" in message
    assert "fraction" in message and "percentages 0-100" in message and "97.27" in message
    # the same values as percentages score; a lone small percentage among others is fine
    percent = tmp_path / "percent.json"
    percent.write_text(json.dumps({"svhn": 97.24, "dtd": 0.5}))
    assert load_accuracies(str(percent)) == {"svhn": 97.24, "dtd": 0.5}
    for value in (101.0, -3.0, float("nan")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"svhn": value}))
        with pytest.raises(SubmissionError, match=f"{re.escape(str(bad))}: svhn"):
            load_accuracies(str(bad))
