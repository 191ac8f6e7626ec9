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

import argparse
import copy
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from common.cli import DEVICE_CHOICES_HELP, Parser, positive_int, resolve_device, resolve_workers, run_cli
from common.engine import EVAL_COMPILE_HELP, EVAL_COMPILE_MODES, compile_for_eval
from common.errors import MissingFileError, UsageError
from common.heads import classifier_name, reset_classifier
from common.maskfile import load_masks
from common.masking import fold_masks, piggyback
from common.methods import MASKS_FILE, get_method, read_task_metadata, task_file
from common.multitask import MultiTaskModel
from common.plots import plot_grouped_bars, save_run_plots
from common.synthetic import is_synthetic
from common.runlog import atomic_write_bytes, atomic_write_json
from decathlon.accounting import decathlon_accounting, mask_file_cost
from decathlon.data import DecathlonDataset, annotation_path, build_loader, build_transforms
from decathlon.engine import Precision, predict
from decathlon.models import open_backbone
from decathlon.score import (FINETUNE_TOP1, PIGGYBACK_TOP1, SubmissionError, TaskTestSet,
                             decathlon_score, load_test_labels, score_results, task_points,
                             validate_results)
from decathlon.tasks import MASK_TASKS, SOURCE_TASK, TASK_NAMES, get_task
from decathlon.config import DATA_ROOT_ENV, DEFAULT_DATA_ROOT

__all__ = ["get_args_parser", "main", "TaskRun", "find_runs", "predict_tasks", "build_summary",
           "format_summary", "write_submission", "task_test_set", "select_tasks", "MODES",
           "TASKS_PNG"]

MASK_FILE = MASKS_FILE
TASKS_PNG = "tasks.png"


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


def _image_size(run: Optional[TaskRun], backbone_meta: dict) -> Tuple[int, int]:
    # Test images go through the evaluation transform the task was trained with.
    source = run.config if run is not None else backbone_meta
    return int(source.get("resize", 72)), int(source.get("crop", 64))


def predict_tasks(predictor, tasks: List[str], runs: Dict[str, TaskRun], backbone_meta: dict,
                  args, prec: Precision, log=print
                  ) -> Tuple[List[Tuple[int, int]], Dict[str, TaskTestSet]]:
    """Predict every test image of ``tasks``: (image_id, category_id) pairs and test sets."""
    pairs, test_sets = [], {}
    for task in tasks:
        spec = get_task(task)
        resize, crop = _image_size(runs.get(task), backbone_meta)
        dataset = DecathlonDataset(args.data_root, task, "test",
                                   transform=build_transforms(task, False, resize=resize, crop=crop))
        loader = build_loader(dataset, batch_size=args.batch_size, train=False, workers=resolve_workers(args.workers))
        model = compile_for_eval(predictor.model_for(task), args.compile)
        classes = predict(model, loader, prec=prec).tolist()
        pairs += [(i, spec.category_id(c)) for i, c in zip(dataset.image_ids, classes)]
        test_sets[task] = task_test_set(dataset)
        log(f"[{task}] predicted {len(classes)} test images")
    return pairs, test_sets


# ------------------------------------------------------------------------- summary


def _headline(test_scores: Optional[dict], val: dict, missing: List[str]) -> Tuple[float, str]:
    """The score to show first, and where it comes from."""
    if test_scores is None:
        return val["score"], "validation top-1 (estimate, not a test score)"
    # Labels for a task that was not submitted score it 0, as the challenge's server did;
    # a submitted task without labels cannot be scored, so the figure is then a lower bound.
    unlabelled = [t for t in test_scores["unscored_tasks"] if t not in missing]
    if unlabelled:
        return test_scores["score"], (f"test labels (lower bound: no labels for "
                                      f"{', '.join(unlabelled)}, counted 0)")
    return test_scores["score"], "test labels"


def build_summary(*, runs: Dict[str, TaskRun], missing: List[str],
                  test_sets: Dict[str, TaskTestSet], num_predictions: int, backbone_params: int,
                  backbone_meta: dict, backbone_path: Path, test_scores: Optional[dict],
                  mode: str) -> dict:
    """summary.json: score, parameter ratio, bytes on disk and per-task figures."""
    costs = {task: mask_file_cost(run.mask_path) for task, run in runs.items()}
    accounting = decathlon_accounting(backbone_params, costs,
                                      backbone_file_bytes=backbone_path.stat().st_size)
    # validation top-1 as trained (mask metadata, else metrics.json); imagenet12's from
    # the backbone file
    found = {t: r.meta.get("val_top1", r.metrics.get("val_top1")) for t, r in runs.items()}
    if SOURCE_TASK not in missing:
        found[SOURCE_TASK] = backbone_meta.get("val_top1")
    val_top1 = {t: float(v) for t, v in found.items() if v is not None}
    val = decathlon_score(val_top1)
    score, source = _headline(test_scores, val, missing)
    submitted = [t for t in TASK_NAMES if t not in missing]
    tasks = {}
    for task in TASK_NAMES:
        entry = {"status": "submitted" if task in test_sets and task not in missing else "missing",
                 "test_images": len(test_sets[task].image_ids) if task in test_sets else 0,
                 "val_top1": val_top1.get(task), "val_points": val["points"][task]}
        if test_scores is not None and task in test_scores["top1"]:
            entry.update(test_top1=test_scores["top1"][task], test_points=test_scores["points"][task])
        if task in costs:
            c = costs[task]
            entry.update(mask_file=str(runs[task].mask_path), sparsity=c["sparsity"],
                         mask_bits=c["mask_bits"], mask_bytes=(c["mask_bits"] + 7) // 8,
                         extra_params=c["extra_params"], head_params=c["head_params"],
                         norm_params=c["norm_params"], other_params=c["other_params"],
                         file_bytes=c["file_bytes"])
        elif task == SOURCE_TASK:
            entry.update(note="backbone's own classifier")
        tasks[task] = entry
    mask_tasks = sorted(costs)
    par_note = None
    if len(mask_tasks) < len(MASK_TASKS):
        absent = [t for t in MASK_TASKS if t not in costs]
        par_note = (f"#par counts the backbone and the masks of the {len(mask_tasks)} submitted "
                    f"mask tasks only; {len(absent)} of the nine ({', '.join(absent)}) would add "
                    f"their own masks and heads")
    return {
        "score": score,
        "score_source": source,
        "complete": not missing,
        "submitted_tasks": submitted,
        "missing_tasks": sorted(missing),
        "missing_tasks_score": "0 points each (no predictions)" if missing else None,
        "val_score": val["score"],
        "val_score_note": "estimate from validation top-1 of the submitted tasks, not a test score",
        "test_score": test_scores["score"] if test_scores is not None else None,
        "test_unscored_tasks": test_scores["unscored_tasks"] if test_scores is not None else None,
        "parameter_ratio": accounting["parameter_ratio"],
        "parameter_ratio_masks_only": accounting["parameter_ratio_masks_only"],
        "parameter_ratio_tasks": mask_tasks,
        "parameter_ratio_note": par_note,
        "bytes": accounting["bytes"],
        "num_predictions": num_predictions,
        "mode": mode,
        "backbone": {"path": str(backbone_path), "arch": backbone_meta.get("arch"),
                     "params": backbone_params, "val_top1": backbone_meta.get("val_top1")},
        "accounting": accounting,
        "tasks": tasks,
        "pictures": {},
    }


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_summary(summary: dict) -> str:
    """summary.md: the headline figures, one table row per task, links to the pictures."""
    b = summary["bytes"]
    missing = summary["missing_tasks"]
    lines = ["# Visual Decathlon submission", ""]
    if summary.get("synthetic"):
        lines += ["**Synthetic data**: the data root was written by a generator; these figures say nothing "
                  "about the method.", ""]
    if missing:
        lines += [f"**Partial submission: {len(missing)} of 10 tasks missing ({', '.join(missing)}).** "
                  f"They have no predictions and score 0; #par covers only the submitted tasks.", ""]
    lines += [
        f"- score: **{summary['score']:.1f}** / 10000 (from {summary['score_source']})",
        f"- validation estimate: {summary['val_score']:.1f} (val top-1 of the submitted tasks; "
        f"not a test score)",
        "- test score: " + ("not scored (no --labels)" if summary["test_score"] is None else
                            f"{summary['test_score']:.1f} (tasks without labels: "
                            f"{', '.join(summary['test_unscored_tasks']) or 'none'})"),
        f"- parameter ratio (#par): **{summary['parameter_ratio']:.4f}** "
        f"(masks alone {summary['parameter_ratio_masks_only']:.4f}; "
        f"backbone {summary['backbone']['params']:,} parameters; counts "
        f"{len(summary['parameter_ratio_tasks'])} mask tasks)",
    ]
    if summary.get("parameter_ratio_note"):
        lines.append(f"- note: {summary['parameter_ratio_note']}")
    lines.append(f"- bytes on disk: backbone {_fmt(b['backbone_file'], ',')}, task files "
                 f"{_fmt(b['task_files'], ',')}, total {_fmt(b['total_files'], ',')} "
                 f"(bit-exact: {b['total_ideal']:,})")
    lines += ["", "| task | status | test images | val top-1 | val points | test top-1 | "
              "test points | sparsity | mask bytes | extra params | of which head | of which BN | "
              "file bytes |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for task, t in summary["tasks"].items():
        lines.append(" | ".join([
            f"| {task}", "**missing**" if t["status"] == "missing" else t["status"],
            str(t["test_images"]), _fmt(t["val_top1"], ".2f"),
            _fmt(t["val_points"], ".1f"), _fmt(t.get("test_top1"), ".2f"),
            _fmt(t.get("test_points"), ".1f"), _fmt(t.get("sparsity"), ".4f"),
            _fmt(t.get("mask_bytes"), ","), _fmt(t.get("extra_params"), ","),
            _fmt(t.get("head_params"), ","), _fmt(t.get("norm_params"), ","),
            _fmt(t.get("file_bytes"), ",")]) + " |")
    pictures = summary.get("pictures") or {}
    if pictures.get("tasks"):
        lines += ["", "## Per task against the paper", "",
                  f"![accuracy and points per task]({pictures['tasks']})"]
    runs = pictures.get("runs") or {}
    if runs:
        lines += ["", "## Training runs", ""]
        for task, files in runs.items():
            links = ", ".join(f"[{Path(f).stem}]({f})" for f in files)
            lines.append(f"- {task}: {links}")
    return "\n".join(lines) + "\n"


def plot_tasks(summary: dict, path) -> Path:
    """tasks.png: top-1 and points per task of this submission (test when scored, else
    validation) next to the paper's Piggyback row and the Finetune baseline."""
    scored = summary["test_score"] is not None
    key = "test_top1" if scored else "val_top1"
    ours = {t: e.get(key) for t, e in summary["tasks"].items()}
    label = "this submission (test)" if scored else "this submission (validation)"
    points = {t: (task_points(t, v) if v is not None else None) for t, v in ours.items()}
    paper_points = {t: task_points(t, v) for t, v in PIGGYBACK_TOP1.items()}
    notes = {t: "missing" for t in summary["missing_tasks"]}
    return plot_grouped_bars(
        [("top-1 accuracy (%)", {label: ours, "Piggyback (paper)": PIGGYBACK_TOP1,
                                  "Finetune baseline": FINETUNE_TOP1}),
         ("decathlon points (max 1000)", {label: points, "Piggyback (paper)": paper_points,
                                          "Finetune baseline": {t: 250.0 for t in TASK_NAMES}})],
        list(TASK_NAMES), path, notes=notes, synthetic=bool(summary.get("synthetic")),
        title=f"Score {summary['score']:.0f} ({summary['score_source']}) vs Piggyback 2838 "
              f"and Finetune 2500 as published")


def write_submission(out, pairs: List[Tuple[int, int]], summary: dict,
                     run_dirs: Optional[Dict[str, Path]] = None) -> Dict[str, Path]:
    """Write results.json, results.zip, tasks.png, summary.json and summary.md into
    ``out`` atomically; each run folder of ``run_dirs`` gets its curves and sparsity
    pictures, which summary.md links."""
    out = Path(out)
    results = json.dumps([{"image_id": i, "category_id": c} for i, c in pairs]).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("results.json", results)
    paths = {"results": atomic_write_bytes(out / "results.json", results),
             "zip": atomic_write_bytes(out / "results.zip", buffer.getvalue()),
             "tasks_png": plot_tasks(summary, out / TASKS_PNG)}
    pictures = {"tasks": TASKS_PNG, "runs": {}}
    for task, folder in (run_dirs or {}).items():
        files = save_run_plots(folder)
        if files:
            pictures["runs"][task] = [os.path.relpath(f.resolve(), out.resolve()) for f in files]
    summary["pictures"] = pictures
    paths["summary"] = atomic_write_json(out / "summary.json", summary)
    paths["summary_md"] = atomic_write_bytes(out / "summary.md", format_summary(summary).encode())
    return paths


# ------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m decathlon.submit",
               description="Predict the test images of all ten decathlon tasks with one backbone and "
                           "nine mask files; write results.json, results.zip and a summary.")
    env = os.environ.get(DATA_ROOT_ENV)
    p.add_argument("--runs", required=True, metavar="DIR",
                   help=f"the --out folder of decathlon.train, holding <task>/{MASK_FILE}")
    p.add_argument("--data-root", default=env or DEFAULT_DATA_ROOT, metavar="DIR",
                   help=f"decathlon-1.0 folder holding the test annotations (default: ${DATA_ROOT_ENV} if set, "
                        f"else {DEFAULT_DATA_ROOT})")
    p.add_argument("--backbone", default=None, metavar="PATH",
                   help="the backbone file the masks were trained on (default: the one the runs' mask files name)")
    p.add_argument("--arch", default=None, metavar="NAME",
                   help="check that the backbone file holds this architecture (default: no check)")
    p.add_argument("--out", default="submissions/latest", metavar="DIR",
                   help="folder for results.json, results.zip, summary.json, summary.md and tasks.png "
                        "(default: submissions/latest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a submission already in --out (default: refuse)")
    p.add_argument("--mode", choices=list(MODES), default="multitask",
                   help="multitask: one backbone in memory, masks switched per task; fold: one "
                        "plain network per task with its masks folded in (default: multitask)")
    p.add_argument("--allow-missing", action="store_true",
                   help="submit even when tasks have no run or no test data; they get no "
                        "predictions and score 0 (listed in the summary)")
    p.add_argument("--labels", default=None, metavar="DIR",
                   help="also score the submission against labelled <task>_test.json files here")
    p.add_argument("--batch-size", type=positive_int, default=256, help="test images per batch (default: 256)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader worker processes reading the test images; 0 reads them in the main "
                        "process (default: half the usable CPU cores, at most 8)")
    p.add_argument("--device", default="auto", help=f"where to run: {DEVICE_CHOICES_HELP} (default: auto)")
    p.add_argument("--compile", choices=list(EVAL_COMPILE_MODES), default="auto",
                   help=EVAL_COMPILE_HELP.replace("this evaluation", "each task's predictions (once per task)"))
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.labels is not None and not Path(args.labels).is_dir():
        p.error(f"--labels {args.labels} is not a folder")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if (Path(args.out) / "results.json").exists() and not args.overwrite:
        p.error(f"--out {args.out} already holds a submission (results.json); pass --overwrite to replace it, "
                f"or choose another --out")
    return args


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


def main(args: argparse.Namespace, log=print) -> dict:
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
    return run_cli(get_args_parser(), main, argv, check_args)


if __name__ == "__main__":
    sys.exit(cli())
