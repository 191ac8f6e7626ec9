"""``python -m segmentation.demo --out DIR``: the whole pipeline on a machine with nothing.

Writes a small synthetic SBD + VOC tree in the real formats and a synthetic (random)
narrow VGG backbone file, trains a piggyback FCN-32s on it with ``segmentation.train``
(12 epochs, 3-5 CPU-minutes: about 5 minutes of wall clock on two shared CPU cores),
evaluates the run with ``segmentation.evaluate`` (prediction pictures included), draws the
run's training curves and mask sparsity (:func:`common.plots.save_run_plots`) and writes
``DIR/metrics.json``.
The masks and the new layers learn to segment the coloured shapes (mean IoU well above
the background-only baseline, see the pictures), but with synthetic data and a random
backbone the numbers say nothing about the method on real images.
"""
from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, List, Optional

import torch

from common.errors import UsageError
from common.settings import Settings, at_least, option
from common.plots import save_run_plots
from common.atomic import atomic_write_bytes, atomic_write_json
from common.runlog import RunDir

from . import evaluate as evaluate_cli
from . import train as train_cli
from .model import build_vgg
from .synthetic import write_synthetic_pascal

__all__ = ["SegDemoConfig", "get_args_parser", "main", "write_synthetic_backbone", "NOTICE"]

NOTICE = ("SYNTHETIC DEMO: data and backbone are synthetic (coloured shapes on a noisy grey background; "
          "a randomly initialised narrow VGG, vgg-tiny, instead of ImageNet VGG-16). The model learns to "
          "segment these shapes, but the metrics say nothing about the method on real images.")
ARCH = "vgg-tiny"


@dataclass(frozen=True)
class SegDemoConfig(Settings):
    PROG: ClassVar[str] = "python -m segmentation.demo"
    DESCRIPTION: ClassVar[str] = "Run the segmentation pipeline end to end on synthetic data."

    out: Optional[str] = option(None, "empty or new folder for the data (DIR/data), the run (DIR/run) and "
                                "DIR/metrics.json (required)", metavar="DIR")
    epochs: int = option(12, "training epochs", group="optimisation", type=int)
    train_images: int = option(64, "synthetic SBD train images", group="data", type=int)
    seed: int = option(0, "seed of the data, the backbone and training", type=int)
    device: str = option("cpu", "where to run: auto|cpu|cuda|cuda:N", group="runtime", metavar="DEV")
    workers: int = option(0, "DataLoader workers", group="runtime", type=int)

    def check(self) -> None:
        super().check()
        if self.out is None:
            raise UsageError("--out is required: an empty or new folder")
        at_least("epochs", self.epochs, 1)
        at_least("train_images", self.train_images, 2)
        at_least("workers", self.workers, 0)
        out = Path(self.out)
        if (out / "run").exists() or (out / "data").exists():
            raise UsageError(f"{out} already holds a demo (data/ or run/); choose a new --out")


def get_args_parser():
    return SegDemoConfig.parser()


def write_synthetic_backbone(path: Path, seed: int) -> Path:
    """A random ``vgg-tiny`` state_dict in torchvision's key layout, as a .pth file."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = build_vgg(ARCH).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _train_argv(args, data: Path, backbone: Path, val_list: Path, run: Path) -> List[str]:
    return ["--data-root", str(data), "--split", "sbd", "--val-list", str(val_list), "--arch", ARCH,
            "--backbone", str(backbone), "--epochs", str(args.epochs), "--batch-size", "2",
            "--out", str(run), "--seed", str(args.seed), "--workers", str(args.workers),
            "--device", args.device, "--print-freq", "8",
            # A short run on a random backbone needs faster learning than the VGG-16 defaults.
            # Batches of 2: twice the steps of batches of 4 for about the same time per epoch
            # (conv1_1's 100-pixel padding dominates the cost). Adam for the zero-initialised
            # score layer, masks 10x faster than the paper. At that mask lr the default mask
            # init of 1e-2 reaches the threshold (5e-3) after about 6 steps, before the score
            # layer has learnt anything, and the weights switched off at once make the loss
            # jump a hundredfold; an init of 2e-2 gives the head 15 steps.
            "--lr", "1e-3", "--mask-scale", "2e-2",
            "--head-optimizer", "adam", "--head-lr", "3e-2", "--head-weight-decay", "0"]


def main(args: SegDemoConfig) -> dict:
    out = Path(args.out)
    data, run = out / "data", out / "run"
    print(NOTICE)
    # Sides of 96-128 pixels give a 4 x 4 to 5 x 5 score map at stride 32: enough cells to
    # outline the shapes, and cheap next to the 100-pixel padding of conv1_1.
    layout = write_synthetic_pascal(data, n_sbd_train=args.train_images, n_sbd_val=4, n_voc_train=4,
                                    n_voc_val=22, n_overlap=2, size=(96, 128), seed=args.seed)
    backbone = write_synthetic_backbone(data / f"synthetic-{ARCH}.pth", args.seed)
    print(f"synthetic SBD tree in {layout.sbd}, VOC tree in {layout.voc}, backbone {backbone}")

    trained = train_cli.main(train_cli.parse_config(_train_argv(args, data, backbone, layout.seg11valid, run)))

    evaluated = evaluate_cli.main(evaluate_cli.SegEvaluateConfig.from_cli(
        [str(run), "--pictures", "4", "--device", args.device, "--workers", str(args.workers)]))

    log = RunDir(run).read_log()
    plots = save_run_plots(run)
    result = {"synthetic_data": True, "synthetic_backbone": True, "notice": NOTICE,
              "data_root": str(data), "run": str(run), "pictures": str(run / "pictures"),
              "plots": [str(p) for p in plots],
              "train_loss_per_epoch": [r["train_loss"] for r in log],
              **{k: evaluated[k] for k in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou", "per_class_iou",
                                           "eval_images", "storage")},
              "sparsity": trained.get("sparsity")}
    atomic_write_json(out / "metrics.json", result)
    print(f"wrote {out / 'metrics.json'}; training curves and mask sparsity: "
          f"{', '.join(str(p) for p in plots) or 'none'}")
    print(NOTICE)
    return result


def cli(argv=None) -> int:
    return SegDemoConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
