"""Benchmark 7: reading the files the field published.

Files are written here in the published layouts (the legacy torch layout, protocol 2) at
full size: the piggyback authors' packed masks of five datasets on ResNet-50 and one of
their training checkpoints (the stand-ins of their classes under ``tests/published``), the
decathlon's ResNet-26 as the residual adapters' ``.t7`` stores it, and torchvision's
ResNet-50 weights. Each is read and converted by the toolkit's commands' functions, timed
as medians of repeated runs; torchvision's weights are also read with ``torch.load(...,
weights_only=True)`` side by side, the baseline the safe reader is measured against.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from benchmarks.harness import Section, median
from classification.published import convert_published
from common.torchfile import read_state_dict
from common.maskfile import read_mask_metadata
from decathlon.models import import_backbone

GOAL_S = 2.0
DATASETS = (("cubs_cropped", 200), ("stanford_cars_cropped", 196), ("flowers", 102), ("wikiart", 195),
            ("sketches", 250))
TESTS = Path(__file__).resolve().parents[1] / "tests"


def _timed(fn, rounds: int):
    times, out = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return median(times), out


def _write_files(tmp: Path, legacy_files) -> dict:
    torch.manual_seed(0)
    net = torchvision.models.resnet50()
    weights = tmp / "resnet50-19c8e357.pth"
    torch.save(net.state_dict(), weights)
    torch.save(net.state_dict(), tmp / "resnet50-legacy.pth", _use_new_zipfile_serialization=False)
    files = {"weights": weights, "weights_legacy": tmp / "resnet50-legacy.pth"}
    g = torch.Generator().manual_seed(1)
    with legacy_files.published_modules() as m:
        shared = m["networks"].ModifiedResNet(net.state_dict()).shared
        masks = {name: {i: (torch.rand(mod.weight.shape, generator=g) > 0.2).to(torch.uint8)
                        for i, mod in enumerate(shared.modules()) if isinstance(mod, nn.Conv2d)}
                 for name, _ in DATASETS}
        heads = {name: nn.Linear(2048, n) for name, n in DATASETS}
        files["packed"] = legacy_files.write_legacy(tmp / "resnet50_binary.pth", {"dataset2masks": masks,
                                                                                  "dataset2classifiers": heads},
                                                    py2=True, v1=True, old_variables=True)
        wrapper = m["networks"].ModifiedResNet(net.state_dict(), masked=True)
        wrapper.add_dataset("cubs_cropped", 200)
        wrapper.set_dataset("cubs_cropped")
        args = argparse.Namespace(arch="resnet50", dataset="cubs_cropped", threshold_fn="binarizer", train_bn=False)
        files["checkpoint"] = legacy_files.write_legacy(tmp / "ckpt.pth", {"args": args, "epoch": 30, "model": wrapper,
                                                                           "accuracy": 80.0, "errors": [20.0]},
                                                        py2=True, v1=True, old_variables=True)
        ra = m["models"].resnet26((1000,))
        files["resnet26"] = legacy_files.write_legacy(tmp / "imnet.t7", {"net": ra, "acc": 60.0, "epoch": 60},
                                                      py2=True, v1=True, old_variables=True)
    return files


def run(quick: bool, context: dict) -> Section:
    section = Section("7. Reading published files",
                      "Full-size files in the published layouts (legacy torch layout, Python 2 pickles), read and "
                      "converted on one CPU thread; nothing in them is run.")
    if not (TESTS / "legacy_files.py").is_file():
        section.check("published-file fixtures", "tests/ not present", "a checkout", None)
        return section
    sys.path.insert(0, str(TESTS))
    import legacy_files
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = _write_files(tmp, legacy_files)
        quiet = lambda s: None  # noqa: E731
        t_packed, written = _timed(lambda: convert_published(files["packed"], "resnet50", files["weights"],
                                                             tmp / "packed", log=quiet), rounds)
        t_ckpt, _ = _timed(lambda: convert_published(files["checkpoint"], "resnet50", files["weights"], tmp / "ckpt",
                                                     log=quiet), rounds)
        t_ra, _ = _timed(lambda: import_backbone(files["resnet26"], tmp / "resnet26.safetensors", log=quiet), rounds)
        t_safe, _ = _timed(lambda: read_state_dict(files["weights_legacy"]), rounds + 2)
        t_torch, _ = _timed(lambda: torch.load(files["weights_legacy"], map_location="cpu", weights_only=True),
                            rounds + 2)
        masked = sum(p.numel() for n, p in torchvision.models.resnet50().named_parameters()
                     if n.endswith("weight") and p.dim() == 4)
        bits = []
        for path in written:
            meta = read_mask_metadata(path)
            head = meta["num_classes"] * 2049 * 4
            bits.append(8 * (meta["file_bytes"] - head) / masked)
        sizes = {k: files[k].stat().st_size / 2 ** 20 for k in ("packed", "checkpoint", "resnet26", "weights_legacy")}
    rows = [
        ["packed masks of 5 datasets -> 5 mask files (classification.import_masks)", f"{sizes['packed']:.0f}",
         f"{t_packed:.2f}", f"{t_packed / len(DATASETS):.2f}"],
        ["training checkpoint -> 1 mask file (classification.import_masks)", f"{sizes['checkpoint']:.0f}",
         f"{t_ckpt:.2f}", f"{t_ckpt:.2f}"],
        ["ResNet-26 .t7 -> backbone file (decathlon.import_backbone)", f"{sizes['resnet26']:.0f}", f"{t_ra:.2f}",
         f"{t_ra:.2f}"],
        ["torchvision ResNet-50 weights, legacy layout: the safe reader", f"{sizes['weights_legacy']:.0f}",
         f"{t_safe:.2f}", ""],
        ["the same file: torch.load(weights_only=True)", f"{sizes['weights_legacy']:.0f}", f"{t_torch:.2f}", ""],
    ]
    section.table("Seconds (medians) for each kind of file, ResNet-50 (23.5 M masked weights) unless named; each "
                  "conversion includes building the torchvision network and reading its ImageNet weights.",
                  ["file kind", "MB", "s in all", "s per mask file"], rows)
    section.table("The five converted mask files: bits per masked weight, the classifier left aside.",
                  ["dataset", "bits per masked weight"], [[n, f"{b:.4f}"] for (n, _), b in zip(DATASETS, bits)])
    for name, value in (("packed masks, per dataset, ResNet-50", t_packed / len(DATASETS)),
                        ("a training checkpoint, ResNet-50", t_ckpt), ("the ResNet-26 .t7 backbone", t_ra)):
        section.check(f"import of {name}", f"{value:.2f} s", f"< {GOAL_S:.0f} s", value < GOAL_S)
    section.check("safe reader against torch.load(weights_only=True), legacy ResNet-50 weights",
                  f"{t_safe / t_torch:.2f}x", "<= 2x", t_safe / t_torch <= 2.0)
    section.check("converted masks, bits per masked weight", f"{max(bits):.4f} (max of 5)", "<= 1.01",
                  max(bits) <= 1.01)
    return section
