"""The configuration of ``classification.train``: the shared fields and rules of
:mod:`common.config` plus the ImageFolder data settings of the paper's section 4."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

from common.config import TrainConfig, option
from common.errors import UsageError
from common.methods import get_method

__all__ = ["ClassificationConfig", "DATA_ROOT_ENV"]

DATA_ROOT_ENV = "CLASSIFICATION_ROOT"


@dataclass(frozen=True)
class ClassificationConfig(TrainConfig):
    PROG: ClassVar[str] = "python -m classification.train"
    DESCRIPTION: ClassVar[str] = ("Learn a new classification task on a frozen ImageNet network with a piggyback "
                                  "mask (or a baseline of the paper's Table 2) over an ImageFolder tree "
                                  "DIR/train/<class>/*, DIR/test/<class>/* (or val/).")
    DATA_ROOT_ENV: ClassVar[Optional[str]] = DATA_ROOT_ENV
    RESOLVED_ABSENT: ClassVar[Dict[str, object]] = {"test_images": None}
    AUTO: ClassVar[Dict[str, str]] = {
        "compile": "on for CUDA (torch.compile's default mode), off on the CPU",
        "amp": "off: fp32 (TF32 matrix units on a GPU)",
        "channels_last": "on for CUDA, off on the CPU",
    }

    data_root: Optional[str] = option("data/classification", "ImageFolder tree: train/, val/, test/",
                                      default_text="$CLASSIFICATION_ROOT or data/classification",
                                      metavar="DIR", path=True, resume="free")
    out: str = option("runs/classification", "run folder for config.json, log.jsonl, checkpoints and results",
                      metavar="DIR", path=True, resume="free")
    arch: Optional[str] = option(None, "torchvision name (resnet50, vgg16 ...) or timm:NAME", metavar="NAME",
                                 default_text="the one a .safetensors --weights records")
    backbone: Optional[str] = option(None, "ImageNet weights: a path, a file name in the torch hub cache, or imagenet", flags=("--weights", "--backbone"), metavar="FILE",
                                     resume="free")
    lr_steps: Optional[Tuple[int, ...]] = option((15,), "epochs after which the learning rates are multiplied "
                                                 "by --lr-gamma",
                                                 group="optimisation", type=int, nargs="*", metavar="EPOCH")
    size: int = option(224, "input size in px", group="data", type=int)
    eval_resize: Optional[int] = option(None, "evaluation: shorter side to this, then a centre "
                                        "--size crop", group="data", type=int, default_text="size * 256 / 224")
    crop_scale: Tuple[float, float] = option((0.08, 1.0), "training crops cover a random fraction in [LO, HI] "
                                             "of the image", group="data", type=float,
                                             nargs=2, metavar=("LO", "HI"))
    hflip: str = option("on", "random horizontal flips at training time", group="data", choices=("on", "off"))
    eval_split: str = option("auto", "split scored each epoch; auto: val/ if present (test/ once at the end)",
                             group="data", choices=("auto", "test", "val"))
    train_limit: Optional[int] = option(None, "train on a class-balanced subset of N images", group="data",
                                        type=int, metavar="N", default_text="all")
    eval_limit: Optional[int] = option(None, "evaluate on a class-balanced subset of N images", group="data",
                                       type=int, metavar="N", default_text="all")
    init_masks: Optional[str] = option(None, "start from a training checkpoint of the authors' code", group="masks", metavar="FILE", path=True,
                                       absent=None)
    skip_unreadable: bool = option(False, "leave out undecodable images (listed in config.json)", group="data", type=bool)

    @classmethod
    def derive(cls, values):
        if values.get("eval_resize") is None and values.get("size") is not None:
            values["eval_resize"] = int(round(values["size"] * 256 / 224))
        return super().derive(values)

    def check(self) -> None:
        super().check()
        if not get_method(self.method).needs_backbone and not self.arch:
            raise UsageError(f"--method {self.method} needs --arch")
        if self.init_masks and not get_method(self.method).uses_masks:
            raise UsageError(f"--init-masks starts piggyback masks; --method {self.method} trains none")
        if self.size < 8:
            raise UsageError(f"--size must be >= 8, got {self.size}")
        if self.eval_resize < self.size:
            raise UsageError(f"--eval-resize {self.eval_resize} must be >= --size {self.size}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UsageError(f"--crop-scale {self.crop_scale[0]} {self.crop_scale[1]}: need 0 < LO <= HI <= 1")
        for key in ("train_limit", "eval_limit"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be >= 1")

    @classmethod
    def backbone_flag(cls) -> str:
        return "--weights FILE"

    @classmethod
    def backbone_help(cls) -> str:
        return "an ImageNet weight file of --arch"
