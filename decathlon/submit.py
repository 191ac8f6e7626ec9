"""``python -m decathlon.submit``: one ``results.json`` for all ten tasks, and its summary.

The backbone is loaded once. Each of the nine mask tasks brings ``RUNS/<task>/masks.safetensors``
(from ``decathlon.train``), switched into one multi-task model (``--mode multitask``) or
folded into a plain copy of the backbone (``--mode fold``); imagenet12 is predicted by the
backbone with its own classifier. Every image of ``<task>_test_stripped.json`` is
predicted, the submission is validated (:func:`decathlon.score.validate_results`) and
only then ``OUT/results.json``, ``results.zip``, ``summary.json`` and ``summary.md`` are
written, each atomically.

With ``--labels`` the summary's ``score`` is the decathlon score on those test labels
(tasks that were not submitted count 0, as on the challenge's server); without, it is
the estimate from validation top-1, labelled as such. ``val_score`` and ``test_score`` are
both kept. A partial submission (``--allow-missing``) says which tasks are missing and
that #par counts only the submitted ones. Storage and #par come from
:mod:`decathlon.accounting`. Pictures: ``tasks.png`` (accuracy and points per task against
the paper's Piggyback row and the Finetune baseline) in OUT, and each task run's
``curves.png`` / ``sparsity.png`` (:func:`common.plots.save_run_plots`), linked from
``summary.md``.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from common.cli import resolve_device, resolve_workers
from common.config import EvalConfig
from common.engine import compile_for_eval
from common.errors import MissingFileError, UsageError
from common.heads import classifier_name, reset_classifier
from common.maskfile import load_masks
from common.masking import fold_masks, piggyback
from common.methods import MASKS_FILE, get_method, read_task_metadata
from common.multitask import MultiTaskModel
from common.settings import option
from common.synthetic import is_synthetic
from common.loaders import build_loader
from decathlon.data import DecathlonDataset, annotation_path, build_transforms
from common.amp import Precision
from common.classify import predict
from decathlon.models import open_backbone
from decathlon.networks import model_names
from decathlon.report import build_summary, format_summary, write_submission
from decathlon.score import SubmissionError, TaskTestSet, load_test_labels, score_results, validate_results
from decathlon.tasks import MASK_TASKS, SOURCE_TASK, TASK_NAMES, get_task
from decathlon.config import DATA_ROOT_ENV, DEFAULT_DATA_ROOT

__all__ = ["SubmitConfig", "get_args_parser", "main", "cli", "TaskRun", "find_runs", "predict_tasks",
           "task_test_set", "select_tasks", "MODES"]

MASK_FILE = MASKS_FILE


@dataclass
class TaskRun:
    """One trained task found under ``--runs``."""
    task: str
    mask_path: Path
    meta: dict
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SubmissionError(f"{path} is not valid JSON: {exc}") from None


def find_runs(runs_dir, tasks=MASK_TASKS) -> Tuple[Dict[str, TaskRun], List[str]]:
    """The task runs under ``runs_dir`` whose method trained masks, and the tasks lacking
    one (no finished run, or a baseline's full weights)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise MissingFileError(f"--runs {runs_dir} is not a folder (expected the --out of "
                              f"python -m decathlon.train, holding <task>/{MASK_FILE})")
    found, missing = {}, []
    for task in tasks:
        try:
            meta = read_task_metadata(runs_dir / task)
        except MissingFileError:
            missing.append(task)
            continue
        path = Path(meta["file"])
        if not get_method(meta.get("method", "piggyback")).uses_masks:
            missing.append(task)
            continue
        if meta.get("task", task) != task:
            raise SubmissionError(f"{path} holds masks of task {meta['task']!r}, not {task!r}")
        found[task] = TaskRun(task, path, meta, _read_json(runs_dir / task / "metrics.json"),
                              _read_json(runs_dir / task / "config.json"))
    return found, missing


def task_test_set(dataset: DecathlonDataset) -> TaskTestSet:
    """What a submission must cover for a task's test split: its image ids, and the
    task's category ids P+1 .. P+C (the data loader has checked the file's categories)."""
    spec = dataset.spec
    return TaskTestSet(spec.name, frozenset(dataset.image_ids),
                       frozenset(range(spec.prefix + 1, spec.prefix + spec.num_classes + 1)))


# ------------------------------------------------------------------------- models


def _skip(model: nn.Module, meta: dict) -> tuple:
    """The layers the mask file's run left unmasked: as recorded, else the classifier."""
    skip = meta.get("skip")
    return tuple(skip) if isinstance(skip, (list, tuple)) else (classifier_name(model),)


def _task_model(backbone: nn.Module, run: TaskRun) -> nn.Module:
    """A plain copy of the backbone with the task's masks folded in and its head."""
    model = copy.deepcopy(backbone)
    if run.meta.get("skip") is None:
        # A file that does not record its conversion (mask-file version 1): redo it as
        # decathlon.train did. Newer files convert the plain copy themselves.
        reset_classifier(model, int(run.meta.get("num_classes", get_task(run.task).num_classes)))
        piggyback(model, threshold=run.meta["threshold"], scheme=run.meta["scheme"],
                  train_bn=bool(run.meta.get("train_bn", False)), skip=_skip(model, run.meta))
    load_masks(model, run.mask_path)
    return fold_masks(model).eval()


class _Folded:
    """--mode fold: one plain network per task with its masks folded in, built on demand."""

    def __init__(self, backbone: nn.Module, runs: Dict[str, TaskRun], device: torch.device):
        self.backbone, self.runs, self.device = backbone.to(device), runs, device

    def model_for(self, task: str) -> nn.Module:
        if task == SOURCE_TASK:
            return self.backbone
        return _task_model(self.backbone, self.runs[task]).to(self.device)


class _Switched:
    """--mode multitask: one piggybacked backbone in memory, each task's masks (of any
    scheme), scheme extras and head switched in by ``MultiTaskModel.set_task``."""

    def __init__(self, backbone: nn.Module, runs: Dict[str, TaskRun], device: torch.device):
        # Task-specific BN is per-task state: tasks without it get the backbone's own BN back.
        train_bn = any(bool(r.meta.get("train_bn", False)) for r in runs.values())
        threshold = next(iter(runs.values())).meta["threshold"] if runs else 5e-3
        base = copy.deepcopy(backbone)
        meta = next(iter(runs.values())).meta if runs else {}
        piggyback(base, threshold=threshold, train_bn=train_bn, skip=_skip(base, meta))
        self.model = MultiTaskModel(base)
        self.model.add_backbone_task(SOURCE_TASK)
        for task, run in runs.items():
            self.model.add_task(task, run.mask_path)
        self.model.to(device).eval()

    def model_for(self, task: str) -> nn.Module:
        self.model.set_task(task)
        return self.model


MODES = {"multitask": _Switched, "fold": _Folded}


def _image_size(run: Optional[TaskRun], backbone_meta: dict) -> Dict[str, Any]:
    # Test images go through the evaluation transform the task was trained with; the
    # backbone's own task (imagenet12) through the backbone's.
    source = run.config if run is not None else backbone_meta
    preprocess = source.get("preprocess") or "auto"
    if preprocess == "auto":
        preprocess = backbone_meta.get("preprocess", "square")
    return {"resize": int(source.get("resize", 72)), "crop": int(source.get("crop", 64)), "preprocess": preprocess}


def predict_tasks(predictor, tasks: List[str], runs: Dict[str, TaskRun], backbone_meta: dict,
                  args, prec: Precision, log=print
                  ) -> Tuple[List[Tuple[int, int]], Dict[str, TaskTestSet]]:
    """Predict every test image of ``tasks``: (image_id, category_id) pairs and test sets."""
    pairs, test_sets = [], {}
    for task in tasks:
        spec = get_task(task)
        dataset = DecathlonDataset(args.data_root, task, "test",
                                   transform=build_transforms(task, False, **_image_size(runs.get(task), backbone_meta)))
        loader = build_loader(dataset, batch_size=args.batch_size, train=False, workers=resolve_workers(args.workers))
        model = compile_for_eval(predictor.model_for(task), args.compile)
        classes = predict(model, loader, prec=prec).tolist()
        pairs += [(i, spec.category_id(c)) for i, c in zip(dataset.image_ids, classes)]
        test_sets[task] = task_test_set(dataset)
        log(f"[{task}] predicted {len(classes)} test images")
    return pairs, test_sets


# ------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class SubmitConfig(EvalConfig):
    PROG: ClassVar[str] = "python -m decathlon.submit"
    DESCRIPTION: ClassVar[str] = ("Predict the test images of all ten decathlon tasks with one backbone and nine "
                                  "mask files; write results.json, results.zip and a summary.")
    DATA_ROOT_ENV: ClassVar[Optional[str]] = DATA_ROOT_ENV

    runs: Optional[str] = option(None, f"the --out folder of decathlon.train, holding <task>/{MASK_FILE} (required)",
                                 group="input", metavar="DIR")
    data_root: str = option(DEFAULT_DATA_ROOT, f"decathlon-1.0 folder of the test annotations; "
                            f"${DATA_ROOT_ENV} if set", group="input", metavar="DIR")
    backbone: Optional[str] = option(None, "the backbone file the masks were trained on", group="input",
                                     metavar="PATH", default_text="the one the runs' mask files name")
    arch: Optional[str] = option(None, "check that the backbone file holds this architecture", group="input",
                                 metavar="NAME", choices=model_names, default_text="no check")
    labels: Optional[str] = option(None, "also score the submission against labelled <task>_test.json files here",
                                   group="input", metavar="DIR")
    out: str = option("submissions/latest", "folder for results.json/.zip, summary.json/.md, "
                      "tasks.png", metavar="DIR")
    overwrite: bool = option(False, "replace a submission already in --out", type=bool)
    mode: str = option("multitask", "multitask: masks on one backbone; fold: one network per task", choices=tuple(MODES))
    allow_missing: bool = option(False, "submit without tasks lacking a run or test data (score 0)", type=bool)
    batch_size: int = option(256, "test images per batch", type=int)
    workers: Optional[int] = option(None, "processes reading the test images; 0: the main process", group="runtime", type=int,
                                    default_text="half the cores, at most 8")

    def check(self) -> None:
        super().check()
        if self.runs is None:
            raise UsageError("--runs is required: the --out folder of decathlon.train")
        if self.labels is not None and not Path(self.labels).is_dir():
            raise UsageError(f"--labels {self.labels} is not a folder")
        if (Path(self.out) / "results.json").exists() and not self.overwrite:
            raise UsageError(f"--out {self.out} already holds a submission (results.json); pass --overwrite to "
                             f"replace it, or choose another --out")


def get_args_parser():
    return SubmitConfig.parser()


def _backbone_path(args, runs: Dict[str, TaskRun]) -> Path:
    """--backbone, else the one backbone file every run was trained on."""
    if args.backbone:
        return Path(args.backbone)
    named = sorted({str(r.meta["backbone"]) for r in runs.values() if r.meta.get("backbone")})
    if len(named) == 1 and Path(named[0]).is_file():
        return Path(named[0])
    raise UsageError("pass --backbone FILE: the runs do not name one existing backbone "
                     f"file (they name {named or 'none'})")


def _is_baseline(run_dir: Path) -> bool:
    try:
        return not get_method(read_task_metadata(run_dir).get("method", "piggyback")).uses_masks
    except MissingFileError:
        return False


def select_tasks(args) -> Tuple[Dict[str, TaskRun], List[str], List[str]]:
    """(runs to submit, missing tasks, tasks to predict); missing tasks (no run, or no
    test annotations) are refused unless --allow-missing."""
    runs, no_run = find_runs(args.runs)
    baselines = [t for t in no_run if _is_baseline(Path(args.runs) / t)]
    no_data = [t for t in TASK_NAMES if t not in no_run
               and not annotation_path(args.data_root, t, "test_stripped").is_file()]
    if (no_run or no_data) and not args.allow_missing:
        raise SubmissionError(
            "cannot submit all ten tasks: "
            + (f"no {MASK_FILE} under {args.runs} for {', '.join(no_run)}; " if no_run else "")
            + (f"({', '.join(baselines)} hold weights.safetensors of a baseline method, which "
               "this command does not submit); " if baselines else "")
            + (f"no test annotations ({{task}}_test_stripped.json) under --data-root {args.data_root} for "
               f"{', '.join(no_data)}: point --data-root (or ${DATA_ROOT_ENV}) at the decathlon-1.0 folder; "
               if no_data else "")
            + ("train them, or " if no_run else "")
            + "pass --allow-missing to submit without them (they score 0)")
    missing = [t for t in TASK_NAMES if t in no_run or t in no_data]
    tasks = [t for t in TASK_NAMES if t not in missing]
    return {t: r for t, r in runs.items() if t in tasks}, missing, tasks


def main(args: SubmitConfig, log=print) -> dict:
    runs, missing, tasks = select_tasks(args)
    backbone_path = _backbone_path(args, runs)
    backbone, backbone_meta = open_backbone(backbone_path, args.arch, log=log)
    prec = Precision(resolve_device(args.device))
    predictor = MODES[args.mode](backbone.eval(), runs, prec.device)
    pairs, test_sets = predict_tasks(predictor, tasks, runs, backbone_meta, args, prec, log=log)
    for task in missing:  # an allowed-missing task with test data must be wholly absent
        if annotation_path(args.data_root, task, "test_stripped").is_file():
            test_sets[task] = task_test_set(DecathlonDataset(args.data_root, task, "test"))
    validate_results(pairs, test_sets.values(), allow_missing_tasks=missing)
    test_scores = score_results(pairs, load_test_labels(args.labels)) if args.labels else None
    summary = build_summary(
        runs=runs, missing=missing, test_sets=test_sets, num_predictions=len(pairs),
        backbone_params=sum(p.numel() for p in backbone.parameters()), backbone_meta=backbone_meta,
        backbone_path=backbone_path, test_scores=test_scores, mode=args.mode)
    if is_synthetic(args.data_root):
        summary["synthetic"] = True  # tasks.png and summary.md say so
    paths = write_submission(args.out, pairs, summary,
                             run_dirs={t: Path(args.runs) / t for t in runs})
    log(format_summary(summary))
    log(f"wrote {paths['results']} ({len(pairs)} predictions), {paths['zip']}, "
        f"{paths['summary']}, {paths['summary_md']}, {paths['tasks_png']}")
    return summary


def cli(argv=None) -> int:
    return SubmitConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
