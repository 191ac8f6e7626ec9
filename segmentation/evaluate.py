"""Evaluate a saved segmentation run: ``python -m segmentation.evaluate RUN_DIR``.

Rebuilds the run's FCN from its config.json (same architecture, backbone source and
input convention), loads its masks.safetensors or model.safetensors, and computes the
FCN metrics on the run's evaluation set (or ``--split``'s). Results go to
``RUN_DIR/evaluation.json`` (``--output`` to change), with the storage report.
``--pictures N`` writes, for the first N images, a palette PNG of the prediction
(VOC colours, class ids as indices) and an overview PNG: input | ground truth |
prediction at full resolution, captioned with the image id and the image's mean IoU,
with a legend of the classes present. Runs under torchrun as well; the confusion matrix
is reduced across processes.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
from torch.utils.data import DataLoader

from common.amp import default_amp
from common.cli import resolve_workers
from common.config import EvalConfig, read_run_config
from common.methods import MaskSettings, load_task
from common.distributed import cleanup, init_distributed, make_sampler
from common.engine import compile_for_eval
from common.errors import UsageError
from common.metrics import ConfusionMatrix
from common.atomic import atomic_write_json
from common.runlog import RunDir
from common.settings import SWITCH_CHOICES, at_least, option
from common.synthetic import is_synthetic

from .data import IGNORE_INDEX, NUM_CLASSES, SPLITS, SegmentationDataset, build_split, class_names, pad_collate
from .engine import evaluate_segmentation, predict_labels, summarize
from .palette import save_label_png, save_overview
from .report import format_metrics, format_storage, storage_report
from .runs import build_run_model
from .weights import resolve_backbone


@dataclass(frozen=True)
class SegEvaluateConfig(EvalConfig):
    PROG: ClassVar[str] = "python -m segmentation.evaluate"
    DESCRIPTION: ClassVar[str] = "Evaluate a saved FCN-32s segmentation run."

    run_dir: Optional[str] = option(None, "run folder written by segmentation.train", metavar="RUN_DIR",
                                    positional=True)
    data_root: Optional[str] = option(None, "dataset folder", group="data", metavar="DIR", default_text="the run's")
    split: Optional[str] = option(None, "evaluation split", group="data", choices=tuple(sorted(SPLITS)),
                                  default_text="the run's")
    val_list: Optional[str] = option(None, "ids to evaluate instead of seg11valid (--split sbd)", group="data",
                                     metavar="FILE", default_text="the run's")
    backbone: Optional[str] = option(None, "backbone weights file, if it moved since training", group="input",
                                     metavar="PATH", default_text="the run's")
    caffe_weights: Optional[str] = option(None, "Caffe-converted weights, if moved since training",
                                          group="input", metavar="PATH", default_text="the run's")
    weights: Optional[str] = option(None, "mask or model file to load", group="input", metavar="FILE",
                                    default_text="the one in RUN_DIR")
    output: Optional[str] = option(None, "where to write the metrics", metavar="FILE",
                                   default_text="RUN_DIR/evaluation.json")
    pictures: int = option(0, "write prediction pictures for the first N evaluation images", type=int, metavar="N")
    pictures_dir: Optional[str] = option(None, "folder for the pictures", metavar="DIR",
                                         default_text="RUN_DIR/pictures")
    batch_size: int = option(1, "images per batch (one: padding would change predictions near borders)", type=int,
                             cli=False)
    workers: Optional[int] = option(None, "loader worker processes; 0 loads in the main process",
                                    group="runtime", type=int, default_text="half the cores, at most 8")
    amp: str = option("auto", "bf16 autocast; auto = on for CUDA devices with bf16", group="runtime",
                      choices=SWITCH_CHOICES)
    compile: str = option("auto", "torch.compile the FCN (dynamic sizes); auto = off: "
                          "each image is seen once", group="runtime", choices=SWITCH_CHOICES)

    def check(self) -> None:
        super().check()
        if self.backbone and self.caffe_weights:
            raise UsageError("--backbone and --caffe-weights exclude each other")
        at_least("pictures", self.pictures, 0)
        if self.pictures_dir and not self.pictures:
            raise UsageError("--pictures-dir needs --pictures N")


def get_args_parser():
    return SegEvaluateConfig.parser()


class RunMismatch(UsageError):
    """Flags that do not fit the run being evaluated."""


def _source_for(config: dict, args):
    """The backbone source of the run, with a moved file's new path if given."""
    kind = config["backbone_kind"]
    if kind == "random":
        if args.backbone or args.caffe_weights:
            raise RunMismatch("the run was trained from a random backbone; --backbone/--caffe-weights do not apply")
        return resolve_backbone(config["arch"], random_init=True)
    if kind == "caffe":
        if args.backbone:
            raise RunMismatch("the run used Caffe-converted weights: pass --caffe-weights, not --backbone")
        return resolve_backbone(config["arch"], caffe_weights=args.caffe_weights or config["backbone_path"])
    if args.caffe_weights:
        raise RunMismatch("the run used torchvision-layout weights: pass --backbone, not --caffe-weights")
    return resolve_backbone(config["arch"], backbone=args.backbone or config["backbone_path"])


@torch.no_grad()
def save_pictures(model, dataset: SegmentationDataset, count: int, out_dir: Path,
                  device: torch.device, amp: bool = False, synthetic: bool = False) -> int:
    """Prediction PNG and overview PNG for the first ``count`` images; returns how many."""
    model.eval()
    n = min(count, len(dataset))
    names = class_names() if model.num_classes == NUM_CLASSES else []
    for index in range(n):
        image, label = dataset.load(index)
        x = dataset.convention.to_tensor(image).unsqueeze(0).to(device)
        prediction = predict_labels(model, x, amp=amp)[0].cpu().numpy().astype("uint8")
        image_id = dataset.ids[index]
        # this image's mean IoU over the classes in its ground truth or prediction
        confusion = ConfusionMatrix(model.num_classes, ignore_index=IGNORE_INDEX)
        confusion.update(torch.from_numpy(label.astype("int64")), torch.from_numpy(prediction.astype("int64")))
        save_label_png(prediction, out_dir / f"{image_id}_prediction.png")
        save_overview(image, prediction, out_dir / f"{image_id}_overview.png", target=label,
                      image_id=image_id, iou=confusion.compute()["mean_iou"], class_names=names,
                      synthetic=synthetic)
    return n


def main(args: SegEvaluateConfig) -> dict:
    run = RunDir(args.run_dir, is_main=False)
    if not run.file(RunDir.CONFIG).is_file():
        raise RunMismatch(f"{run.file(RunDir.CONFIG)} does not exist: RUN_DIR must be a folder written by "
                        f"python -m segmentation.train")
    config = read_run_config(run.path)
    dist_info = init_distributed(args.device, workers=args.workers)
    try:
        return _evaluate_run(args, run, config, dist_info)
    finally:
        cleanup()


def _evaluate_run(args, run: RunDir, config: dict, dist_info) -> dict:
    device = dist_info.device
    amp = default_amp(device) if args.amp == "auto" else args.amp == "on"
    source = _source_for(config, args)
    masks = None
    if config["method"] == "piggyback":
        masks = MaskSettings(**{k: config[k] for k in ("scheme", "threshold", "mask_init", "mask_scale")
                                if config.get(k) is not None})
    model = build_run_model(config["arch"], config["method"], source, seed=config["seed"],
                        learn_upsample=config["learn_upsample"], num_classes=config.get("num_classes", NUM_CLASSES),
                        masks=masks)
    load_task(args.weights or run.path, model)
    model.to(device)

    split = args.split or config["split"]
    val_list = args.val_list or (config.get("val_list") if split == "sbd" else None)
    dataset = build_split(split, "val", args.data_root or config["data_root"], source.convention, val_list)
    loader = DataLoader(dataset, batch_size=1, sampler=make_sampler(dataset, dist_info, False, 0),
                        num_workers=resolve_workers(args.workers), collate_fn=pad_collate)
    metrics = evaluate_segmentation(compile_for_eval(model, args.compile, dynamic=True), loader, device, model.num_classes, amp=amp,
                       is_main=dist_info.is_main)
    names = class_names()
    storage = storage_report(model)
    result = {"run": str(run.path), "split": split, "method": config["method"], "arch": config["arch"],
              "eval_images": len(dataset), **summarize(metrics, names), "storage": storage}
    if getattr(dataset, "listed", None) is not None:
        result["eval_listed"] = dataset.listed
    if dist_info.is_main:
        output = Path(args.output) if args.output else run.file("evaluation.json")
        atomic_write_json(output, result)
        print(format_metrics(result, names))
        print(format_storage(storage))
        if args.pictures:
            folder = Path(args.pictures_dir) if args.pictures_dir else run.file("pictures")
            n = save_pictures(model, dataset, args.pictures, folder, device, amp,
                              synthetic=bool(config.get("synthetic")) or is_synthetic(args.data_root or config["data_root"]))
            result["pictures"] = str(folder)
            print(f"wrote {n} prediction pictures to {folder}")
        print(f"metrics written to {output}")
    return result


def cli(argv=None) -> int:
    return SegEvaluateConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
