"""Benchmark 6, part D (accelerator): ``classification.train`` and ``segmentation.train`` end to end
on synthetic trees and random weight files, one process per run (see :mod:`benchmarks.gpu`).
"""
from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from benchmarks.harness import Section, fmt, median
from common.config import read_run_config
from common.errors import UsageError
from common.atomic import atomic_write_bytes
from common.runlog import RunDir

TRAINING_PIPELINES = {"classification": "classification.train", "segmentation": "segmentation.train"}
TRAINING_METHODS = ("piggyback", "finetune")
# the affine pairs first: a call cut short keeps them
TRAINING_RUNS = ("classification:piggyback", "classification:piggyback:affine", "segmentation:piggyback",
                 "segmentation:piggyback:affine", "classification:finetune")
CLASSES = 10  # of the synthetic ImageFolder tree


class TrainingRun(NamedTuple):
    label: str
    pipeline: str
    method: str
    scheme: Optional[str]  # None for finetuning
    flags: List[str]  # the command's method flags


class TrainingSetup(NamedTuple):
    """What part D trains: the networks, input sizes, epochs and synthetic image counts."""

    cls_arch: str = "resnet50"
    cls_size: int = 224
    cls_epochs: int = 3
    cls_images: int = 3200
    seg_arch: str = "vgg16"
    seg_epochs: int = 2
    seg_images: int = 100
    seg_sides: Tuple[int, int] = (320, 500)


def parse_training_run(spec: str) -> TrainingRun:
    """``PIPELINE:METHOD[:SCHEME]`` -> the run; SCHEME (piggyback only) defaults to binary."""
    from common.schemes import scheme_names
    parts = spec.split(":")
    ok = len(parts) in (2, 3) and parts[0] in TRAINING_PIPELINES and parts[1] in TRAINING_METHODS and (
        len(parts) == 2 or (parts[1] == "piggyback" and parts[2] in scheme_names()))
    if not ok:
        raise argparse.ArgumentTypeError(
            f"training run {spec!r}: expected PIPELINE:METHOD[:SCHEME], e.g. classification:piggyback:affine or "
            f"segmentation:finetune (PIPELINE {'|'.join(TRAINING_PIPELINES)}, METHOD {'|'.join(TRAINING_METHODS)}, "
            f"SCHEME {'|'.join(scheme_names())}, with piggyback only)")
    pipeline, method = parts[:2]
    scheme = (parts[2] if len(parts) == 3 else "binary") if method == "piggyback" else None
    label = f"{pipeline}, {method}" + (f" {scheme}" if scheme else "")
    return TrainingRun(label, pipeline, method, scheme, ["--method", method] + (["--scheme", scheme] if scheme else []))


def _write_once(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(folder)`` into a scratch folder beside ``path``, then renamed to ``path``: a
    write cut short leaves no tree that a later call would take as complete."""
    scratch = path.with_name(f".{path.name}.partial")
    if scratch.exists():
        shutil.rmtree(scratch)
    write(scratch)
    scratch.rename(path)
    return path


def classification_tree(root: Path, setup: TrainingSetup, log=print) -> Path:
    """Part D's ImageFolder tree under ``root``, written when missing: :data:`CLASSES`
    classes, ``cls_images`` training images and a tenth as many test images, JPEGs of side
    ``round(cls_size * 256 / 224)`` (classification.train's evaluation resize)."""
    side = round(setup.cls_size * 256 / 224)
    per_class = max(1, setup.cls_images // CLASSES)
    tree = root / f"imagefolder-{per_class * CLASSES}-{side}px"
    if not tree.is_dir():
        from classification.synthetic import write_synthetic_image_folder
        t0 = time.perf_counter()
        _write_once(tree, lambda folder: write_synthetic_image_folder(
            folder, classes=CLASSES, train_per_class=per_class, test_per_class=max(1, per_class // 10), side=side))
        log(f"wrote a synthetic ImageFolder tree at {tree} in {time.perf_counter() - t0:.0f}s")
    return tree


def segmentation_tree(root: Path, setup: TrainingSetup, log=print) -> Tuple[Path, Path]:
    """Part D's SBD + VOC tree under ``root``, written when missing: ``seg_images`` SBD
    training images with sides in ``seg_sides``, a tenth as many (at least 2) evaluation
    images. Returns (the tree, its seg11valid list)."""
    lo, hi = setup.seg_sides
    tree = root / f"pascal-{setup.seg_images}-{lo}-{hi}px"
    if not tree.is_dir():
        from segmentation.synthetic import write_synthetic_pascal
        t0 = time.perf_counter()
        _write_once(tree, lambda folder: write_synthetic_pascal(
            folder, n_sbd_train=setup.seg_images, n_sbd_val=2, n_voc_train=2,
            n_voc_val=max(2, setup.seg_images // 10), n_overlap=0, size=(lo, hi)))
        log(f"wrote a synthetic SBD + VOC tree at {tree} in {time.perf_counter() - t0:.0f}s")
    return tree, tree / "seg11valid.txt"


def random_weights(root: Path, pipeline: str, arch: str) -> Path:
    """A randomly initialised ``arch`` state dict (torchvision's layout) as ``root``/
    ``{pipeline}-{arch}-random.pth``, written when missing."""
    path = root / f"{pipeline}-{arch}-random.pth"
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                if pipeline == "classification":
                    from classification.models import build_network
                    state = build_network(arch).state_dict()
                else:
                    from segmentation.model import build_vgg
                    state = build_vgg(arch).state_dict()
            except (ValueError, KeyError, RuntimeError, UsageError) as exc:
                flag = "--cls-arch" if pipeline == "classification" else "--seg-arch"
                raise UsageError(f"{flag} {arch}: cannot build it ({exc})") from None
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue())
    return path


def training_commands(root: Path, out: Path, runs: Sequence[TrainingRun], setup: TrainingSetup,
                      extra: Sequence[str] = (), log=print) -> List[Tuple[TrainingRun, Path, List[str]]]:
    """(run, run folder, command line) of each run: the trees and weight files under
    ``root`` (written when missing), the run folders under ``out``, ``extra`` flags last."""
    commands = []
    for run in runs:
        run_dir = out / run.label.replace(" ", "_").replace(",", "")
        if run.pipeline == "classification":
            tree = classification_tree(root, setup, log)
            args = ["--data-root", str(tree), "--arch", setup.cls_arch,
                    "--weights", str(random_weights(root, "classification", setup.cls_arch)),
                    "--size", str(setup.cls_size), "--epochs", str(setup.cls_epochs)]
        else:
            tree, val_list = segmentation_tree(root, setup, log)
            args = ["--data-root", str(tree), "--split", "sbd", "--val-list", str(val_list), "--arch", setup.seg_arch,
                    "--backbone", str(random_weights(root, "segmentation", setup.seg_arch)),
                    "--epochs", str(setup.seg_epochs)]
        cmd = [sys.executable, "-m", TRAINING_PIPELINES[run.pipeline], *args, "--out", str(run_dir),
               "--print-freq", "1000", *run.flags, *extra]
        commands.append((run, run_dir, cmd))
    return commands


def read_training_run(run_dir: Path) -> Dict[str, object]:
    """Rates of a finished run from its own log.jsonl and config.json: images/s per epoch
    (images trained / epoch time), the median after the first epoch (which compiles; the
    only epoch of a one-epoch run), ms per step and the share of the epoch outside steps."""
    records = RunDir(run_dir).read_log()
    if not records:
        raise ValueError(f"{run_dir / 'log.jsonl'} holds no epoch")
    batch = int(read_run_config(run_dir)["batch_size"])
    per_epoch = [r["steps"] * batch / r["epoch_time_s"] for r in records]
    steady = records[1:] or records
    step_s = median([r["step_time_s"] for r in steady])
    return {"rate": median(per_epoch[1:] or per_epoch), "per_epoch": per_epoch, "step_ms": 1000 * step_s,
            "step_rate": batch / step_s,
            "outside": median([1 - r["step_time_s"] * r["steps"] / r["epoch_time_s"] for r in steady])}


def training_ratios(results: Dict[str, Dict[str, object]], runs: Sequence[TrainingRun]) -> List[List[str]]:
    """Rows (pipeline, pair, epoch-time ratio, step-time ratio) for every scheme other than
    binary against binary piggyback, and binary piggyback against finetuning, where both
    runs of a pair finished in the same pipeline."""
    rows = []
    for pipeline in TRAINING_PIPELINES:
        mine = {(r.method, r.scheme): results[r.label] for r in runs if r.pipeline == pipeline and r.label in results}
        binary = mine.get(("piggyback", "binary"))
        pairs = [(f"{scheme} / binary", mine[("piggyback", scheme)], binary)
                 for (method, scheme) in mine if method == "piggyback" and scheme != "binary"]
        pairs.append(("piggyback / finetune", binary, mine.get(("finetune", None))))
        for name, a, b in pairs:
            if a is not None and b is not None:
                rows.append([pipeline, name, f"{b['rate'] / a['rate']:.3f}", f"{a['step_ms'] / b['step_ms']:.3f}"])
    return rows


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def training_end_to_end(root: Path, out: Path, runs: Sequence[TrainingRun], setup: TrainingSetup = TrainingSetup(),
                        extra: Sequence[str] = (), log=print,
                        report: Optional[Callable[[Section], None]] = None) -> Section:
    """``classification.train`` and ``segmentation.train`` as users run them, one process
    per run, on synthetic trees and random weights under ``root`` (written when missing),
    the run folders under ``out`` (a folder left there by an earlier call is replaced).
    ``report(section)`` is called after every run, so a cut-off session keeps what it measured."""
    lo, hi = setup.seg_sides
    side = round(setup.cls_size * 256 / 224)
    section = Section(
        "6e. GPU training commands end to end",
        f"`python -m classification.train` ({setup.cls_arch} at {setup.cls_size} px, synthetic ImageFolder tree of "
        f"{CLASSES} classes, {CLASSES * max(1, setup.cls_images // CLASSES):,} training JPEGs of {side}x{side}, "
        f"{_epochs(setup.cls_epochs)}) "
        f"and `python -m segmentation.train` (FCN-32s on {setup.seg_arch}, {setup.seg_images} synthetic SBD training "
        f"images of sides {lo}-{hi} px, {_epochs(setup.seg_epochs)}), random backbone weights, each command's "
        f"defaults otherwise; one process per run. Images/s = images trained per epoch / epoch time (training, "
        f"evaluation, loading and the checkpoint), the median over the epochs after the first (which compiles); "
        f"ms per step and images/s in steps from the training loop alone (loading included).")
    rows, results = [], {}

    def fill():
        section.tables.clear()
        section.table("", ["run", "images/s (median after epoch 1)", "images/s per epoch", "ms per step",
                           "images/s in steps", "outside steps", "command s"], rows)
        ratios = training_ratios(results, runs)
        if ratios:
            section.table("Time ratios (above 1: the first of the pair is slower):",
                          ["pipeline", "pair", "epoch time", "step time"], ratios)

    for run, run_dir, cmd in training_commands(root, out, runs, setup, extra, log):
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a run folder of an earlier call would resume, not train
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = f"{time.perf_counter() - t0:.0f}"
        if proc.returncode != 0:
            tail = (proc.stdout[-2000:] + proc.stderr[-3000:]).strip()
            log(f"  {run.label}: failed (exit {proc.returncode})\n{tail}")
            rows.append([run.label, "failed", "", "", "", "", seconds])
            last = tail.splitlines()[-1] if tail else ""
            section.notes.append(f"**{run.label} failed** (exit {proc.returncode}): `{last[:300]}`")
        else:
            r = results[run.label] = read_training_run(run_dir)
            rows.append([run.label, fmt(r["rate"]), " / ".join(fmt(x) for x in r["per_epoch"]), f"{r['step_ms']:.2f}",
                         fmt(r["step_rate"]), f"{100 * r['outside']:.0f} %", seconds])
            log(f"  {run.label}: {r['rate']:.1f} images/s (epochs: {', '.join(f'{x:.1f}' for x in r['per_epoch'])})")
        fill()
        if report is not None:
            report(section)
    return section
