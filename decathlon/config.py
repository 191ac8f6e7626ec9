"""The configurations of ``decathlon.train`` and ``decathlon.pretrain``: the shared fields
and rules of :mod:`common.config` plus the decathlon's data and loader settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

from common.config import SWITCH_CHOICES, FitConfig, TrainConfig, option
from common.errors import UsageError

__all__ = ["DecathlonData", "DecathlonTrainConfig", "DecathlonPretrainConfig", "DATA_ROOT_ENV",
           "DEFAULT_DATA_ROOT"]

DATA_ROOT_ENV = "DECATHLON_ROOT"
DEFAULT_DATA_ROOT = "data/decathlon-1.0"
_DATA_ROOT_HELP = f"decathlon-1.0 folder (annotations/, data/); ${DATA_ROOT_ENV} if set"

_AUTO = {
    "compile": "CUDA graphs (mode reduce-overhead) on one CUDA device, the default mode across processes, "
               "off on the CPU (BENCHMARKS-gpu.md)",
    "amp": "off: fp32 (TF32 matrix units on a GPU)",
    "channels_last": "on where the network is compiled on a CUDA device, else off",
    "loader": "device on CUDA unless --scale is set, else workers",
    "images_on_device": "on when the train and val images take at most a quarter of the device's free memory",
    "hflip": "per task (off for gtsrb, omniglot, svhn)",
    "preprocess": "the backbone's own: resnet26 for the published ResNet-26, square for the others",
}


def _task_names():
    from decathlon.tasks import TASK_NAMES
    return list(TASK_NAMES)


def _model_names():
    from decathlon.networks import model_names
    return model_names()


@dataclass(frozen=True)
class DecathlonData:
    """Image size, augmentation, decoded-image cache and loader of the decathlon commands."""

    DATA_ROOT_ENV: ClassVar[Optional[str]] = DATA_ROOT_ENV
    AUTO: ClassVar[Dict[str, str]] = _AUTO
    RESOLVED_ABSENT: ClassVar[Dict[str, object]] = {"preprocess": "square"}

    data_root: Optional[str] = option(DEFAULT_DATA_ROOT, _DATA_ROOT_HELP, metavar="DIR", path=True, resume="free")

    preprocess: str = option("auto", "square: whole image to --resize px; resnet26: the reference's",
                             group="data", choices=("auto", "square", "resnet26"), absent="auto")
    resize: int = option(72, "image size in px before cropping (see --preprocess)", group="data", type=int)
    crop: int = option(64, "crop size fed to the network: random at train, centre at eval", group="data", type=int)
    hflip: str = option("auto", "random horizontal flips at train time", group="data", choices=SWITCH_CHOICES)
    scale: Tuple[float, float] = option((1.0, 1.0), "random rescale by a factor in [LO, HI] before "
                                        "cropping; 1 1 is off", group="data", type=float, nargs=2,
                                        metavar=("LO", "HI"))
    cache_dir: Optional[str] = option(None, "keep decoded images here (uint8 memory maps) "
                                      "for the epochs after the first", group="data", metavar="DIR", path=True,
                                      resume="free")
    loader: str = option("auto", "workers: DataLoader workers; device: batches made on the device", group="runtime", choices=("auto", "workers", "device"), resume="free")
    images_on_device: str = option("auto", "--loader device: keep the resized images on the device", group="runtime",
                                   choices=SWITCH_CHOICES, resume="free")

    def check(self) -> None:
        super().check()
        if self.crop < 1 or self.crop > self.resize:
            raise UsageError(f"--crop {self.crop} must be between 1 and --resize {self.resize}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise UsageError(f"--scale {self.scale[0]} {self.scale[1]}: need 0 < LO <= HI")
        if self.loader == "device" and tuple(self.scale) != (1.0, 1.0):
            raise UsageError("--loader device does not rescale images: drop --scale or use --loader workers")
        if self.loader == "device" and self.preprocess == "resnet26":
            raise UsageError("--loader device holds square images: --preprocess resnet26 keeps each image's aspect "
                             "ratio and needs --loader workers")
        if self.images_on_device == "on" and self.loader == "workers":
            raise UsageError("--images-on-device on needs --loader device (or auto)")
        if self.arch is not None and self.arch not in _model_names():
            raise UsageError(f"--arch {self.arch!r} is unknown; valid: {', '.join(_model_names())}")


@dataclass(frozen=True)
class DecathlonTrainConfig(DecathlonData, TrainConfig):
    PROG: ClassVar[str] = "python -m decathlon.train"
    DESCRIPTION: ClassVar[str] = ("Train a piggyback mask (or a baseline) for Visual Decathlon tasks on a frozen "
                                  "backbone.")
    out: str = option("runs/decathlon", "output folder; each task's run folder is OUT/<task>", metavar="DIR",
                      path=True, resume="free")
    task: Optional[str] = option(None, "task to learn, or 'all' for the nine non-ImageNet tasks in turn "
                                 "(required)", choices=None, metavar="TASK")
    arch: Optional[str] = option(None, "network of --method scratch and of unnamed WRN --backbone files",
                                 metavar="NAME", default_text="wrn28_4")
    backbone: Optional[str] = option(None, "backbone file: decathlon.pretrain's, ResNet-26 .t7, WRN state dict", metavar="PATH", path=True,
                                     resume="free")
    epochs: int = option(60, "training epochs", type=int, resume="grow")
    trainval: bool = option(False, "train on train+val (final models; no held-out val)",
                            group="data", type=bool)
    lr_steps: Optional[Tuple[int, ...]] = option((45,), "epochs after which the learning rates are multiplied "
                                                 "by --lr-gamma", group="optimisation", type=int, nargs="*",
                                                 metavar="EPOCH")

    def check(self) -> None:
        super().check()
        valid = _task_names() + ["all"]
        if self.task is None:
            raise UsageError(f"--task is required: one of {', '.join(valid)}")
        if self.task not in valid:
            raise UsageError(f"--task {self.task!r} is unknown; valid: {', '.join(valid)}")

    @classmethod
    def backbone_help(cls) -> str:
        return "a file from python -m decathlon.pretrain or an external WRN state dict"


@dataclass(frozen=True)
class DecathlonPretrainConfig(DecathlonData, FitConfig):
    PROG: ClassVar[str] = "python -m decathlon.pretrain"
    DESCRIPTION: ClassVar[str] = ("Train a decathlon backbone on imagenet12 and write OUT/backbone.safetensors "
                                  "for decathlon.train --backbone.")
    out: str = option("runs/pretrain", "run folder; receives backbone.safetensors", metavar="DIR", path=True, resume="free")
    task: str = option("imagenet12", "task to train the backbone on", metavar="TASK")
    arch: Optional[str] = option(None, "network to train; with --backbone, the file's architecture",
                                 metavar="NAME", default_text="wrn28_4")
    backbone: Optional[str] = option(None, "start from these weights (any decathlon.train --backbone file)",
                                     metavar="PATH", path=True, resume="free")
    epochs: int = option(40, "training epochs", type=int, resume="grow")
    batch_size: int = option(256, "examples per batch on each process", type=int)
    optimizer: Optional[str] = option("sgd", "optimizer (sgd has momentum --momentum)", group="optimisation")
    lr: Optional[float] = option(0.1, "base learning rate", group="optimisation", type=float)
    weight_decay: Optional[float] = option(5e-4, "weight decay", group="optimisation", type=float)
    lr_steps: Optional[Tuple[int, ...]] = option(None, "epochs after which the lr is multiplied by --lr-gamma", group="optimisation", type=int, nargs="*",
                                                 metavar="EPOCH", default_text="1/2 and 3/4 of --epochs")

    @classmethod
    def derive(cls, values):
        if values.get("lr_steps") is None:
            epochs = int(values["epochs"])
            values["lr_steps"] = tuple(sorted({max(1, epochs // 2), max(1, epochs * 3 // 4)}))
        return super().derive(values)

    def check(self) -> None:
        super().check()
        if self.task not in _task_names():
            raise UsageError(f"--task {self.task!r} is unknown; valid: {', '.join(_task_names())}")
