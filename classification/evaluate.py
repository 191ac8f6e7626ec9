"""``python -m classification.evaluate TARGET``: top-1 of a trained run or of a mask file.

``TARGET`` is a run folder of ``classification.train`` (its ``config.json`` and
``masks.safetensors`` or ``weights.safetensors``) or a mask file alone, such as one that
``classification.import_masks`` converted from the piggyback authors' released masks. The
network is rebuilt from the recorded architecture and ImageNet weight file, the mask (or
the full weights) loaded onto it, and the split scored with the recorded evaluation
transform (an imported mask: the authors' test preprocessing of its dataset).
``--data-root`` and ``--weights`` override the recorded paths (files that moved); the
weight file must still be the one the mask was trained on (its fingerprint is checked).
A run folder also receives ``eval_<split>.json``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Tuple

import torch.nn as nn

from common.amp import Precision
from common.classify import evaluate_classifier
from common.cli import resolve_device, resolve_workers
from common.config import EvalConfig, read_run_config
from common.engine import compile_for_eval
from common.errors import DataError, MissingFileError, UsageError
from common.heads import reset_classifier
from common.methods import load_task, read_task_metadata
from common.atomic import atomic_write_json
from common.settings import option
from classification.data import ClassificationTransform, ImageFolderDataset
from common.loaders import build_loader
from classification.models import build_network, pretrained_model

__all__ = ["EvaluateConfig", "get_args_parser", "main", "cli", "load_trained", "evaluate_target"]


@dataclass(frozen=True)
class EvaluateConfig(EvalConfig):
    PROG: ClassVar[str] = "python -m classification.evaluate"
    DESCRIPTION: ClassVar[str] = "Top-1 of a classification.train run folder or of a mask file."

    target: Optional[str] = option(None, "classification.train run folder, or a masks / weights "
                                   ".safetensors file", metavar="RUN_DIR_or_MASKFILE", positional=True,
                                   path=True)
    split: str = option("auto", "split to score; auto: test/, else val/", group="data",
                        choices=("auto", "train", "test", "val"))
    data_root: Optional[str] = option(None, "ImageFolder tree to score", group="data", metavar="DIR", path=True,
                                      default_text="the one the run was trained on")
    weights: Optional[str] = option(None, "the mask's ImageNet weights: a path, cached file name or imagenet", group="input", metavar="FILE", default_text="the recorded file")
    limit: Optional[int] = option(None, "score a class-balanced subset of N images", group="data", type=int,
                                  metavar="N", default_text="all")

    def check(self) -> None:
        super().check()
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")


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
    (arch, classes or num_classes, size, eval_resize, eval_mode, backbone ...).
    ``weights`` overrides the recorded ImageNet weight file."""
    path, meta, config = _describe(Path(target))
    info = {**{k: config.get(k) for k in ("arch", "classes", "size", "eval_resize", "backbone", "data_root")
               if config.get(k) is not None}, **{k: v for k, v in meta.items() if v is not None}}
    if info.get("classes") is not None:
        info["num_classes"] = len(info["classes"])
    for key in ("arch", "num_classes", "size", "eval_resize"):
        if info.get(key) is None:
            raise DataError(f"{path} does not record {key!r}; it was written by neither classification.train nor "
                            f"classification.import_masks")
    if "fingerprint" in meta:  # a mask: the frozen ImageNet network plus the mask file
        backbone = weights or info.get("backbone")
        if not backbone:
            raise UsageError(f"{path} was trained on an ImageNet weight file; pass it with --weights")
        model, _ = pretrained_model(info["arch"], int(info["num_classes"]), backbone)
    else:
        model = build_network(info["arch"])
        reset_classifier(model, int(info["num_classes"]))
    load_task(path, model)
    info["result_file"] = str(path)
    return model, info


def _check_classes(dataset: ImageFolderDataset, info: Dict[str, Any], root) -> None:
    where = Path(root) / dataset.split
    if info.get("classes") is not None:
        if dataset.classes != list(info["classes"]):
            raise DataError(f"{where} has classes {dataset.classes[:5]}... ({dataset.num_classes}); the model was "
                            f"trained on {list(info['classes'])[:5]}... ({len(info['classes'])})")
    elif dataset.num_classes != int(info["num_classes"]):  # an imported mask: class folders in sorted order
        raise DataError(f"{where} has {dataset.num_classes} class folders; the mask's classifier has "
                        f"{info['num_classes']} classes (task {info.get('task', '?')!r})")


def evaluate_target(target, *, split: str = "auto", data_root=None, weights=None, batch_size: int = 64,
                    workers: int = 0, device: str = "auto", limit=None, compile: str = "auto") -> Dict[str, Any]:
    """Score ``target`` on ``split`` of the ImageFolder tree it was trained on (or
    ``data_root``); returns {"top1", "count", "split", ...}."""
    model, info = load_trained(target, weights)
    root = data_root or info.get("data_root")
    if not root:
        raise UsageError(f"{target} does not record its data; pass --data-root")
    tf = ClassificationTransform(train=False, size=int(info["size"]), eval_resize=int(info["eval_resize"]),
                                 eval_mode=info.get("eval_mode", "crop"))
    dataset = ImageFolderDataset(root, split, tf, limit=limit)
    _check_classes(dataset, info, root)
    prec = Precision(resolve_device(device))
    model = compile_for_eval(model.to(prec.device), compile)
    result = evaluate_classifier(model, build_loader(dataset, batch_size=batch_size, train=False, workers=workers),
                                 prec)
    out = {"target": str(target), "result_file": info["result_file"], "arch": info["arch"],
           "data_root": str(Path(root).resolve()), "split": dataset.split, "top1": result["val_top1"],
           "error": 100.0 - result["val_top1"], "loss": result["val_loss"], "count": result["val_count"]}
    if Path(target).is_dir():
        atomic_write_json(Path(target) / f"eval_{dataset.split}.json", out)
    return out


def get_args_parser():
    return EvaluateConfig.parser()


def main(cfg: EvaluateConfig) -> Dict[str, Any]:
    out = evaluate_target(cfg.target, split=cfg.split, data_root=cfg.data_root, weights=cfg.weights,
                          batch_size=cfg.batch_size, workers=resolve_workers(cfg.workers), device=cfg.device,
                          limit=cfg.limit,
                          compile=cfg.compile)
    print(f"{cfg.target}: {out['split']} top-1 {out['top1']:.2f}% (error {out['error']:.2f}%) on {out['count']} "
          f"images of {out['data_root']}")
    return out


def cli(argv=None) -> int:
    return EvaluateConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
