"""The submission's report: ``summary.json`` (score, #par, bytes on disk, per-task figures),
``summary.md`` and ``tasks.png`` (accuracy and points per task against the paper's
Piggyback row and the Finetune baseline), and the files of a submission written
atomically (:func:`write_submission`).

The headline score is the decathlon score on the test labels when they were given (tasks
not submitted count 0, as on the challenge's server), else the estimate from validation
top-1, labelled as such.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from common.plots import plot_grouped_bars, save_run_plots
from common.atomic import atomic_write_bytes, atomic_write_json
from decathlon.accounting import decathlon_accounting, mask_file_cost
from decathlon.score import FINETUNE_TOP1, PIGGYBACK_TOP1, TaskTestSet, decathlon_score, task_points
from decathlon.tasks import MASK_TASKS, SOURCE_TASK, TASK_NAMES

if TYPE_CHECKING:
    from decathlon.submit import TaskRun

__all__ = ["build_summary", "format_summary", "plot_tasks", "write_submission", "TASKS_PNG"]

TASKS_PNG = "tasks.png"


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
