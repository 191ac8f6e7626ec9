"""The Visual Decathlon score and the ``results.json`` submission format.

This module owns three things that need neither torch nor a model:

* the score: per task ``1000 * (max(0, Emax - E) / Emax) ** 2`` with E the top-1 test
  error and ``Emax`` twice the error of the challenge's Finetune baseline, summed over the
  ten tasks (a perfect task earns 1000, the Finetune baseline 2500 in all);
* reading and validating a submission (a flat JSON list of
  ``{"image_id", "category_id"}``): every test image exactly once, every category id one
  of its task's;
* scoring a submission offline against labelled ``<task>_test.json`` annotations as
  published by the challenge's authors.

Command line::

    python -m decathlon.score --accuracies acc.json
    python -m decathlon.score --results results.json --labels labels_test/
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import ClassVar, Iterable, Mapping, Optional, Sequence

from common.errors import DataError, UsageError
from common.settings import Settings, option

# Top-1 test accuracy (percent) of the challenge's Finetune baseline, in the challenge's
# task order. Emax_d = 2 x its error, so the baseline scores exactly 250 per task.
FINETUNE_TOP1 = {
    "imagenet12": 59.87,
    "aircraft": 60.34,
    "cifar100": 82.12,
    "daimlerpedcls": 92.82,
    "dtd": 55.53,
    "gtsrb": 97.53,
    "vgg-flowers": 81.41,
    "omniglot": 87.69,
    "svhn": 96.55,
    "ucf101": 51.20,
}
# Top-1 test accuracy (percent) published for Piggyback (the paper's decathlon row, score 2838).
PIGGYBACK_TOP1 = {
    "imagenet12": 57.69,
    "aircraft": 65.29,
    "cifar100": 79.87,
    "daimlerpedcls": 96.99,
    "dtd": 57.45,
    "gtsrb": 97.27,
    "vgg-flowers": 79.09,
    "omniglot": 87.63,
    "svhn": 97.24,
    "ucf101": 47.48,
}
EMAX = {task: round(2.0 * (100.0 - top1) / 100.0, 6) for task, top1 in FINETUNE_TOP1.items()}
SCORED_TASKS = tuple(FINETUNE_TOP1)
POINTS_PER_TASK = 1000.0
MAX_SCORE = POINTS_PER_TASK * len(SCORED_TASKS)


class SubmissionError(DataError):
    """A submission or an input file that does not follow the challenge's format."""


def _check_task(task: str) -> None:
    if task not in EMAX:
        raise SubmissionError(
            f"unknown decathlon task {task!r}; expected one of {', '.join(SCORED_TASKS)}")


def task_points(task: str, top1: float) -> float:
    """Points earned on ``task`` with top-1 test accuracy ``top1`` (percent, 0-100)."""
    _check_task(task)
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1):
        raise SubmissionError(f"{task}: top-1 accuracy must be a finite number, got {top1!r}")
    if not 0.0 <= top1 <= 100.0:
        raise SubmissionError(f"{task}: top-1 accuracy is a percentage in [0, 100], got {top1}")
    error = 1.0 - top1 / 100.0
    emax = EMAX[task]
    return POINTS_PER_TASK * (max(0.0, emax - error) / emax) ** 2


def decathlon_score(accuracies: Mapping[str, float]) -> dict:
    """Score a mapping task -> top-1 test accuracy (percent).

    A task absent from ``accuracies`` earns 0 points and is listed in ``unscored_tasks``.
    Returns ``{"score", "max_score", "points", "top1", "unscored_tasks"}``.
    """
    for task in accuracies:
        _check_task(task)
    points = {t: task_points(t, accuracies[t]) for t in SCORED_TASKS if t in accuracies}
    return {
        "score": sum(points.values()),
        "max_score": MAX_SCORE,
        "points": {t: points.get(t, 0.0) for t in SCORED_TASKS},
        "top1": {t: float(accuracies[t]) for t in SCORED_TASKS if t in accuracies},
        "unscored_tasks": [t for t in SCORED_TASKS if t not in accuracies],
    }


# ----------------------------------------------------------------------------- format


@dataclass(frozen=True)
class TaskTestSet:
    """What a submission must cover for one task: its test image ids and category ids."""
    task: str
    image_ids: frozenset
    category_ids: frozenset


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_results(obj, source: str = "results") -> list[tuple[int, int]]:
    """Check the shape of a decoded ``results.json`` and return ``(image_id, category_id)`` pairs."""
    if not isinstance(obj, list):
        raise SubmissionError(
            f"{source}: expected a JSON list of {{'image_id', 'category_id'}} objects, "
            f"got {type(obj).__name__}")
    pairs = []
    for i, entry in enumerate(obj):
        if not isinstance(entry, dict) or set(entry) != {"image_id", "category_id"}:
            raise SubmissionError(
                f"{source}[{i}]: expected exactly the keys 'image_id' and 'category_id', "
                f"got {entry!r}")
        if not (_is_int(entry["image_id"]) and _is_int(entry["category_id"])):
            raise SubmissionError(f"{source}[{i}]: ids must be integers, got {entry!r}")
        pairs.append((entry["image_id"], entry["category_id"]))
    return pairs


def load_results(path: str) -> list[tuple[int, int]]:
    """Read and shape-check a ``results.json``."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SubmissionError(f"{path}: cannot read a results JSON list: {exc}") from exc
    return parse_results(obj, source=path)


def _examples(ids: Iterable[int], k: int = 5) -> str:
    ids = sorted(ids)
    more = f" and {len(ids) - k} more" if len(ids) > k else ""
    return ", ".join(str(i) for i in ids[:k]) + more


def validate_results(pairs: Sequence[tuple[int, int]], test_sets: Iterable[TaskTestSet],
                     *, allow_missing_tasks: Iterable[str] = ()) -> None:
    """Refuse a submission that does not cover every test image exactly once.

    Checks: no image id twice, no image id outside the test sets, every category id one of
    its task's, and every test image of every task predicted (tasks in
    ``allow_missing_tasks`` may instead be absent altogether). All problems are gathered
    into one :class:`SubmissionError`.
    """
    test_sets = list(test_sets)
    allowed = set(allow_missing_tasks)
    owner = {}
    for ts in test_sets:
        for image_id in ts.image_ids:
            owner[image_id] = ts
    seen: set[int] = set()
    duplicated, foreign = set(), set()
    wrong_category: dict[str, set] = {}
    for image_id, category_id in pairs:
        if image_id in seen:
            duplicated.add(image_id)
        seen.add(image_id)
        ts = owner.get(image_id)
        if ts is None:
            foreign.add(image_id)
        elif category_id not in ts.category_ids:
            wrong_category.setdefault(ts.task, set()).add(image_id)
    problems = []
    if duplicated:
        problems.append(f"{len(duplicated)} image ids predicted more than once: "
                        f"{_examples(duplicated)}")
    if foreign:
        problems.append(f"{len(foreign)} image ids belong to no test set: {_examples(foreign)}")
    for task, ids in sorted(wrong_category.items()):
        problems.append(f"{task}: {len(ids)} predictions have a category id that is not one "
                        f"of the task's: image ids {_examples(ids)}")
    for ts in test_sets:
        missing = ts.image_ids - seen
        if not missing or (ts.task in allowed and len(missing) == len(ts.image_ids)):
            continue
        problems.append(f"{ts.task}: {len(missing)} of {len(ts.image_ids)} test images "
                        f"have no prediction: {_examples(missing)}")
    if problems:
        raise SubmissionError("invalid submission:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- offline scoring


def load_test_labels(labels_dir: str) -> dict[str, dict[int, int]]:
    """Read every ``<task>_test.json`` in ``labels_dir``: task -> {image_id: category_id}."""
    try:
        names = sorted(n for n in os.listdir(labels_dir) if n.endswith("_test.json"))
    except OSError as exc:
        raise SubmissionError(f"{labels_dir}: cannot list labelled test files: {exc}") from exc
    if not names:
        raise SubmissionError(f"{labels_dir}: no <task>_test.json files found")
    labels = {}
    for name in names:
        task = name[: -len("_test.json")]
        path = os.path.join(labels_dir, name)
        _check_task(task)
        try:
            with open(path) as f:
                coco = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise SubmissionError(f"{path}: cannot read labelled test annotations: {exc}") from exc
        annotations = coco.get("annotations")
        if not isinstance(annotations, list) or not annotations:
            raise SubmissionError(f"{path}: expected a non-empty 'annotations' list "
                                  "(a stripped test file carries no labels)")
        image_ids = {int(im["id"]) for im in coco.get("images", [])}
        truth = {int(a["image_id"]): int(a["category_id"]) for a in annotations}
        if set(truth) != image_ids:
            raise SubmissionError(f"{path}: 'annotations' and 'images' cover different ids")
        labels[task] = truth
    return labels


def score_results(pairs: Sequence[tuple[int, int]], labels: Mapping[str, Mapping[int, int]]) -> dict:
    """Score predictions against labelled test sets.

    A test image without a prediction counts as an error; predictions for images of tasks
    without labels are not scored (``ignored_predictions``), and those tasks are listed in
    ``unscored_tasks``. An image predicted twice is refused, since its answer is ambiguous.
    """
    predicted: dict[int, int] = {}
    for image_id, category_id in pairs:
        if image_id in predicted:
            raise SubmissionError(f"image id {image_id} is predicted more than once")
        predicted[image_id] = category_id
    counts, accuracies, used = {}, {}, 0
    for task, truth in labels.items():
        hits = [predicted.get(i) for i in truth]
        correct = sum(p == truth[i] for p, i in zip(hits, truth))
        n_predicted = sum(p is not None for p in hits)
        used += n_predicted
        counts[task] = {"images": len(truth), "predicted": n_predicted, "correct": correct}
        accuracies[task] = 100.0 * correct / len(truth)
    result = decathlon_score(accuracies)
    result["counts"] = {t: counts[t] for t in SCORED_TASKS if t in counts}
    result["ignored_predictions"] = len(predicted) - used
    return result


def load_accuracies(path: str) -> dict[str, float]:
    """Read a JSON object mapping task name -> top-1 test accuracy in percent."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SubmissionError(f"{path}: cannot read a JSON object of accuracies: {exc}") from exc
    if not isinstance(obj, dict):
        raise SubmissionError(f"{path}: expected a JSON object mapping task name to top-1 "
                              f"accuracy in percent, got {type(obj).__name__}")
    for task, value in obj.items():
        if task not in EMAX:
            raise SubmissionError(f"{path}: unknown task {task!r}; expected a subset of "
                                  f"{', '.join(SCORED_TASKS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SubmissionError(f"{path}: {task}: expected a number (percent), got {value!r}")
        if not 0.0 <= value <= 100.0:
            raise SubmissionError(f"{path}: {task}: {value} is outside 0-100; accuracies are "
                                  f"top-1 percentages")
    # 0.9724 would silently score 0 points: a file of fractions is refused, not rescaled.
    if obj and all(v <= 1.0 for v in obj.values()) and any(v > 0 for v in obj.values()):
        task, value = max(obj.items(), key=lambda kv: kv[1])
        raise SubmissionError(f"{path}: {task}: {value} looks like a fraction (every value is <= 1); "
                              f"accuracies are top-1 percentages 0-100, e.g. {value * 100:g} for "
                              f"{value}")
    return obj


@dataclass(frozen=True)
class ScoreConfig(Settings):
    PROG: ClassVar[str] = "python -m decathlon.score"
    DESCRIPTION: ClassVar[str] = ("Visual Decathlon score, from per-task accuracies or from a submission and "
                                  "labelled test annotations; prints JSON.")

    accuracies: Optional[str] = option(None, "JSON object mapping task name to top-1 test accuracy (percent)",
                                       group="input", metavar="FILE")
    results: Optional[str] = option(None, "a submission's results.json", group="input", metavar="FILE")
    labels: Optional[str] = option(None, "folder of labelled <task>_test.json files (with --results)",
                                   group="input", metavar="DIR")

    def check(self) -> None:
        super().check()
        if (self.accuracies is None) == (self.results is None):
            raise UsageError("give one of --accuracies FILE or --results FILE")
        if self.results is not None and self.labels is None:
            raise UsageError("--results needs --labels DIR (labelled <task>_test.json files)")
        if self.accuracies is not None and self.labels is not None:
            raise UsageError("--labels is only used with --results")


def get_args_parser():
    return ScoreConfig.parser()


def main(args: ScoreConfig) -> dict:
    if args.accuracies is not None:
        result = decathlon_score(load_accuracies(args.accuracies))
    else:
        result = score_results(load_results(args.results), load_test_labels(args.labels))
        unpredicted = {t: c["images"] - c["predicted"] for t, c in result["counts"].items()
                       if c["predicted"] < c["images"]}
        if unpredicted:
            print(f"{sum(unpredicted.values())} labelled test image(s) have no prediction in {args.results} and "
                  f"count as errors: " + ", ".join(f"{t} {n}" for t, n in unpredicted.items()), file=sys.stderr)
        if result.get("ignored_predictions"):
            print(f"{result['ignored_predictions']} prediction(s) of {args.results} were ignored: their image ids are "
                  f"in none of the labelled test files under {args.labels}", file=sys.stderr)
    print(json.dumps(result, indent=2))
    return result


def cli(argv: Sequence[str] | None = None) -> int:
    return ScoreConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
