"""Benchmark 4: images per second of the decathlon data pipeline, per core.

A toy task in the real on-disk format (``decathlon.synthetic``: JPEGs at the real sizes,
COCO-style annotation files) is read through ``decathlon.data.DecathlonDataset`` with the
task's training augmentation, in one process on one thread (= one core):

* from JPEG: every image decoded from its file;
* from the decoded cache: after one filling pass, images come from the memory-mapped cache;
* the same through a ``DataLoader`` (batch 32, collation included, no worker processes).

The model's training throughput on the same machine (benchmark 1) says how many loader
cores one training process needs.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Section, fmt, median
from common.loaders import build_loader, set_loader_epoch
from decathlon.data import DecathlonDataset, annotation_path
from decathlon.synthetic import make_synthetic_decathlon
from decathlon.transforms import build_transforms

GOAL = 10_000  # images per second per core, from the cache, at 72 px


def _pass_rate(dataset, passes: int) -> float:
    """Images per second of a full pass over ``dataset`` (median of ``passes``)."""
    rates = []
    for epoch in range(passes):
        dataset.set_epoch(epoch)
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        rates.append(len(dataset) / (time.perf_counter() - start))
    return median(rates)


def _loader_rate(dataset, passes: int) -> float:
    loader = build_loader(dataset, batch_size=32, train=True, workers=0)
    rates = []
    for epoch in range(passes):
        set_loader_epoch(loader, epoch)
        start = time.perf_counter()
        n = sum(images.shape[0] for images, _ in loader)
        rates.append(n / (time.perf_counter() - start))
    return median(rates)


def measure_task(root: Path, cache_dir: Path, task: str, passes: int) -> dict:
    transform = build_transforms(task, train=True)
    jpeg = DecathlonDataset(root, task, "train", transform=transform)
    cached = DecathlonDataset(root, task, "train", transform=transform, cache_dir=cache_dir / task)
    raw_cached = DecathlonDataset(root, task, "train", cache_dir=cache_dir / task)
    start = time.perf_counter()
    for i in range(len(cached)):  # the filling pass (decode + store + augment)
        cached[i]
    fill = len(cached) / (time.perf_counter() - start)
    return {"images": len(jpeg), "jpeg": _pass_rate(jpeg, passes), "fill": fill,
            "cache": _pass_rate(cached, passes), "cache_raw": _pass_rate(raw_cached, passes),
            "loader": _loader_rate(cached, passes), "sizes": _image_sizes(root, task)}


def _image_sizes(root: Path, task: str) -> str:
    """The distinct image sizes (w x h) of the task's train annotation file."""
    images = json.loads(annotation_path(root, task, "train").read_text())["images"]
    sizes = sorted({(im["width"], im["height"]) for im in images})
    shown = ", ".join(f"{w}x{h}" for w, h in sizes[:3])
    return shown + (f" and {len(sizes) - 3} more" if len(sizes) > 3 else "")


def run(quick: bool, context: dict) -> Section:
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a per-core figure
    section = Section(
        "4. Data pipeline",
        "Images per second on one core (one process, one torch thread) for a toy task in the "
        "real on-disk format, with the task's training augmentation (resize of the whole image "
        "to 72 px, random 64 px crop, flip where allowed, normalisation). *cache, no "
        "augmentation*: the cache read alone (uint8 tensors).")
    tasks = ["cifar100"] if quick else ["cifar100", "aircraft"]
    per_class = 60 if quick else 150
    rows, cache_rates, jpeg_rates = [], [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            make_synthetic_decathlon(tmp / "decathlon-1.0", tasks=tasks, num_classes=20,
                                     train_per_class=per_class, val_per_class=1, test_per_class=1)
            for task in tasks:
                r = measure_task(tmp / "decathlon-1.0", tmp / "cache", task, passes=3)
                rows.append([task, r["sizes"], f"{r['images']:,}", fmt(r["jpeg"]), fmt(r["fill"]), fmt(r["cache"]),
                             fmt(r["loader"]), fmt(r["cache_raw"])])
                cache_rates.append(r["cache"])
                jpeg_rates.append(r["jpeg"])
                section.check(f"from the cache with augmentation, {task}", f"{r['cache']:,.0f} images/s/core",
                              f">= {GOAL:,}", r["cache"] >= GOAL)
    finally:
        torch.set_num_threads(threads)
    section.table("", ["task", "image sizes (w x h)", "train images", "from JPEG", "filling the cache",
                       "from cache", "DataLoader from cache, batch 32", "cache, no augmentation"], rows)
    train_rate = context.get("wrn_train_images_per_s")
    if train_rate:
        section.notes.append(
            f"Training throughput of WRN-28-4 (piggyback, batch 32, 64x64) on this machine with "
            f"{context.get('threads', threads)} thread(s), from benchmark 1: **{train_rate:,.1f} images/s**. "
            f"The cached pipeline delivers {min(cache_rates) / train_rate:,.0f}x that on one core, so "
            f"data loading takes {100 * train_rate / min(cache_rates):.1f} % of a core per training "
            f"process; from JPEG it takes {100 * train_rate / min(jpeg_rates):.1f} %.")
    else:
        section.notes.append("The training benchmark was not run, so no model throughput is shown next to these.")
    section.seconds = time.perf_counter() - start
    return section
