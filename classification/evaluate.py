"""``python -m classification.evaluate TARGET``: top-1 of a trained run or of a mask file.

``TARGET`` is a run folder of ``classification.train`` (its ``config.json`` and
``masks.safetensors`` or ``weights.safetensors``) or a mask file alone. The network is
rebuilt from the recorded architecture and ImageNet weight file, the mask (or the full
weights) loaded onto it, and the split scored with the run's evaluation transform.
``--data-root`` and ``--weights`` override the recorded paths (files that moved); the
weight file must still be the one the mask was trained on (its fingerprint is checked).
A run folder also receives ``eval_<split>.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Tuple

import torch.nn as nn

from common.amp import Precision
from common.classify import evaluate_classifier
from common.cli import DEVICE_CHOICES_HELP, Parser, resolve_device, run_cli
from common.engine import EVAL_COMPILE_HELP, EVAL_COMPILE_MODES, compile_for_eval
from common.errors import DataError, MissingFileError, UsageError
from common.heads import reset_classifier
from common.config import read_run_config
from common.methods import load_task, read_task_metadata
from common.runlog import atomic_write_json
from classification.data import ClassificationTransform, ImageFolderDataset, build_loader
from classification.models import build_model, create_model

__all__ = ["get_args_parser", "main", "cli", "load_trained", "evaluate_target"]


def _describe(target: Path) -> Tuple[Path, Dict[str, Any], Dict[str, Any]]:
    """(task file, its metadata, the run's config or {}) of a run folder or a file."""
    if target.is_dir() and not (target / "config.json").is_file():
        raise MissingFileError(f"{target} is not a run folder of classification.train (no config.json)")
    if not target.exists():
        raise MissingFileError(f"{target} does not exist")
    meta = read_task_metadata(target)
    return Path(meta["file"]), meta, read_run_config(target) if target.is_dir() else {}


def load_trained(target, weights=None) -> Tuple[nn.Module, Dict[str, Any]]:
    """The trained network of a run folder or mask/weights file, and its metadata
    (arch, classes, size, eval_resize, backbone ...). ``weights`` overrides the recorded
    ImageNet weight file."""
    path, meta, config = _describe(Path(target))
    info = {**{k: config.get(k) for k in ("arch", "classes", "size", "eval_resize", "backbone", "data_root")
               if config.get(k) is not None}, **{k: v for k, v in meta.items() if v is not None}}
    for key in ("arch", "classes", "size", "eval_resize"):
        if info.get(key) is None:
            raise DataError(f"{path} does not record {key!r}; it was not written by classification.train")
    if "fingerprint" in meta:  # a mask: the frozen ImageNet network plus the mask file
        backbone = weights or info.get("backbone")
        if not backbone:
            raise UsageError(f"{path} was trained on an ImageNet weight file; pass it with --weights")
        model, _ = create_model(info["arch"], len(info["classes"]), backbone)
    else:
        model = build_model(info["arch"])
        reset_classifier(model, len(info["classes"]))
    load_task(path, model)
    info["result_file"] = str(path)
    return model, info


def evaluate_target(target, *, split: str = "auto", data_root=None, weights=None, batch_size: int = 64,
                    workers: int = 0, device: str = "auto", limit=None, compile: str = "auto") -> Dict[str, Any]:
    """Score ``target`` on ``split`` of the ImageFolder tree it was trained on (or
    ``data_root``); returns {"top1", "count", "split", ...}."""
    model, info = load_trained(target, weights)
    root = data_root or info.get("data_root")
    if not root:
        raise UsageError(f"{target} does not record its data; pass --data-root")
    tf = ClassificationTransform(train=False, size=int(info["size"]), eval_resize=int(info["eval_resize"]))
    dataset = ImageFolderDataset(root, split, tf, limit=limit)
    if dataset.classes != list(info["classes"]):
        raise DataError(f"{Path(root) / dataset.split} has classes {dataset.classes[:5]}... ({dataset.num_classes}); "
                        f"the model was trained on {list(info['classes'])[:5]}... ({len(info['classes'])})")
    prec = Precision(resolve_device(device))
    model = compile_for_eval(model.to(prec.device), compile)
    result = evaluate_classifier(model, build_loader(dataset, batch_size=batch_size, train=False, workers=workers),
                                 prec)
    out = {"target": str(target), "result_file": info["result_file"], "arch": info["arch"],
           "data_root": str(Path(root).resolve()), "split": dataset.split, "top1": result["val_top1"],
           "loss": result["val_loss"], "count": result["val_count"]}
    if Path(target).is_dir():
        atomic_write_json(Path(target) / f"eval_{dataset.split}.json", out)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m classification.evaluate",
                                description="Top-1 of a classification.train run folder or mask file.")
    p.add_argument("target", metavar="RUN_DIR_or_MASKFILE",
                   help="run folder of classification.train, or a masks.safetensors / weights.safetensors file")
    p.add_argument("--split", choices=("auto", "train", "test", "val"), default="auto",
                   help="split to score; auto = test/ if present, else val/ (default: auto)")
    p.add_argument("--data-root", default=None, metavar="DIR",
                   help="ImageFolder tree to score (default: the one the run was trained on)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="the ImageNet weight file the mask was trained on (default: the recorded path)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="score a class-balanced subset of N images (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: 0)")
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES_HELP} (default: auto)")
    p.add_argument("--compile", choices=list(EVAL_COMPILE_MODES), default="auto", help=EVAL_COMPILE_HELP)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.batch_size < 1 or args.workers < 0 or (args.limit is not None and args.limit < 1):
        p.error("--batch-size and --limit must be >= 1, --workers >= 0")
    return args


def main(args: argparse.Namespace) -> Dict[str, Any]:
    out = evaluate_target(args.target, split=args.split, data_root=args.data_root, weights=args.weights,
                          batch_size=args.batch_size, workers=args.workers, device=args.device, limit=args.limit,
                          compile=args.compile)
    print(f"{args.target}: {out['split']} top-1 {out['top1']:.2f}% on {out['count']} images of {out['data_root']}")
    return out


def cli(argv=None) -> int:
    return run_cli(get_args_parser(), main, argv, check_args)


if __name__ == "__main__":
    sys.exit(cli())
