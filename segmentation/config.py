"""The configuration of ``segmentation.train``: the shared fields and rules of
:mod:`common.config` plus FCN-32s's data, backbone and optimizer settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Optional

from common.config import TrainConfig, option
from common.optimizers import optimizer_names
from common.errors import UsageError
from segmentation.data import SPLITS
from segmentation.model import ARCHS

__all__ = ["SegmentationConfig", "DATA_ROOT_ENV", "DEFAULT_DATA_ROOT", "METHODS"]

DATA_ROOT_ENV = "PASCAL_ROOT"
DEFAULT_DATA_ROOT = "data/pascal"
# The methods segmentation offers.
METHODS = ("piggyback", "finetune")


def _archs():
    return list(ARCHS)


def _splits():
    return sorted(SPLITS)


@dataclass(frozen=True)
class SegmentationConfig(TrainConfig):
    PROG: ClassVar[str] = "python -m segmentation.train"
    DESCRIPTION: ClassVar[str] = "Train FCN-32s on a masked (or finetuned) VGG-16 for 21-class PASCAL VOC segmentation."
    DATA_ROOT_ENV: ClassVar[Optional[str]] = DATA_ROOT_ENV
    AUTO: ClassVar[Dict[str, str]] = {
        "compile": "off: images differ in size, and inductor specialises FCN training to each size",
        "amp": "off: fp32 (TF32 matrix units on a GPU)",
    }
    # Backbone weights with --method finetune: the FCN reference's SGD (momentum 0.99, weight
    # decay 5e-4) with its lr of 1e-10 on a loss summed over ~2e5 pixels per image turned into
    # 2e-5 for a mean-reduced loss. Piggyback's masks take theirs from the recipe.
    METHOD_DEFAULTS: ClassVar[Dict[str, Dict[str, Any]]] = {
        "finetune": {"optimizer": "sgd", "lr": 2e-5, "weight_decay": 5e-4}}

    data_root: Optional[str] = option(DEFAULT_DATA_ROOT, "folder of benchmark_RELEASE/ (SBD) and VOCdevkit/; "
                                      f"${DATA_ROOT_ENV} if set", metavar="DIR", path=True, resume="free")
    out: str = option("runs/segmentation", "run folder for config.json, log.jsonl, checkpoints and results",
                      metavar="DIR", path=True, resume="free")
    method: str = option("piggyback", "how the task is learned: piggyback (masks) or finetune", group="method",
                         choices=METHODS)
    arch: Optional[str] = option("vgg16", "backbone architecture", metavar="NAME", choices=_archs)
    backbone: Optional[str] = option(None, "torchvision-layout VGG weights file",
                                     metavar="PATH", path=True, resume="free",
                                     default_text="vgg16-397923af.pth in the torch cache")
    caffe_weights: Optional[str] = option(None, "Caffe-converted VGG-16 weights (input: BGR 0-255 "
                                          "minus the Caffe mean)", metavar="PATH", path=True, resume="free")
    random_init: bool = option(False, "random backbone weights (tests and demos)", type=bool)
    epochs: int = option(15, "training epochs", type=int, resume="grow")
    batch_size: int = option(1, "images per batch on each process", type=int)
    print_freq: int = option(20, "steps between progress lines and the loss checks that read the device",
                             group="runtime", type=int, resume="free")
    split: str = option("sbd", "sbd: SBD train, VOC2011 seg11valid; voc: VOC train/val",
                        choices=_splits,
                        group="data")
    val_list: Optional[str] = option(None, "ids to evaluate instead of seg11valid (--split sbd)", group="data", metavar="FILE", path=True)
    learn_upsample: bool = option(False, "train the bilinear stride-32 upsampling",
                                  group="method", type=bool)
    head_optimizer: str = option("sgd", "optimizer of the new layers", group="optimisation",
                                 choices=optimizer_names)
    head_lr: float = option(2e-5, "learning rate of the new layers", group="optimisation", type=float)
    head_weight_decay: float = option(5e-4, "weight decay of the new layers", group="optimisation", type=float)
    momentum: Optional[float] = option(0.99, "momentum of every SGD optimizer", group="optimisation", type=float)
    lr_steps: tuple = option((), "epochs after which the learning rates are multiplied by --lr-gamma",
                             group="optimisation", type=int, nargs="*", metavar="EPOCH")

    def check(self) -> None:
        # the backbone check of the base class does not apply: the torchvision cache is
        # the default source
        sources = [n for n, v in (("--backbone", self.backbone), ("--caffe-weights", self.caffe_weights),
                                  ("--random-init", self.random_init)) if v]
        if len(sources) > 1:
            raise UsageError(f"{' and '.join(sources)} exclude each other: give at most one backbone source")
        super().check()
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r}: segmentation offers {', '.join(METHODS)}")
        if self.arch not in _archs():
            raise UsageError(f"--arch {self.arch!r} is unknown; valid: {', '.join(_archs())}")
        if self.split not in _splits():
            raise UsageError(f"--split {self.split!r} is unknown; valid: {', '.join(_splits())}")
        if self.val_list and self.split != "sbd":
            raise UsageError("--val-list replaces the seg11valid list and only applies to --split sbd")

    @classmethod
    def needs_backbone_file(cls) -> bool:
        return False
