"""What the decathlon supplies to the training runner (:mod:`common.runner`): a task's
images and per-task transforms, the backbone with a fresh classifier, the classification
loss and top-1 evaluation, and what a run's artifact and ``metrics.json`` record.

:class:`DecathlonTask` learns one task on a frozen backbone (``decathlon.train``);
:class:`PretrainTask` trains the backbone itself on imagenet12 (``decathlon.pretrain``),
whose artifact is the backbone file.

What ``auto`` means here: CUDA graphs on one CUDA device (the fastest end to end on an H100,
BENCHMARKS-gpu.md), torch.compile's default mode across processes (DDP's gradient hooks),
off on the CPU; channels_last where the network is compiled on a CUDA device; batches
augmented on the device from images resized once, where the images are squares; the
backbone's own preprocessing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import torch.nn as nn

from common.classify import ClassificationPipeline
from common.heads import get_classifier, reset_classifier
from common.loaders import set_loader_epoch
from common.optimizers import make_optimizer
from common.atomic import file_sha256
from common.runlog import RunDir
from common.runner import Data, TrainingTask
from common.runtime import AutoPolicy, Runtime
from decathlon.loaders import make_loaders, use_device_loader
from decathlon.models import BACKBONE_FILE, backbone_preprocess, open_backbone, save_backbone
from decathlon.networks import create_model
from decathlon.tasks import get_task

__all__ = ["DecathlonTask", "PretrainTask", "POLICY"]

POLICY = AutoPolicy(compile_cuda="reduce-overhead", compile_distributed=True, channels_last="compiled")


class _Classification(TrainingTask):
    """What both decathlon commands share: the task's loaders and the top-1 pipeline."""

    policy = POLICY
    split = "train"

    def __init__(self, cfg, dist, log=print):
        super().__init__(cfg, dist, log)
        self.spec = get_task(cfg.task)
        self.backbone, self.backbone_meta = None, {}

    def open_weights(self, runtime: Runtime) -> None:
        """The backbone (a wrong --backbone is reported before the data is read); its
        network draws its initialisation before its weights load, as runs always have."""
        if self.cfg.backbone and self.backbone is None:
            self.backbone, self.backbone_meta = open_backbone(self.cfg.backbone, self.cfg.arch, log=self.log)

    @property
    def header(self) -> str:
        return f"[{self.cfg.task}] "

    @property
    def preprocess(self) -> str:
        if self.cfg.preprocess != "auto":
            return self.cfg.preprocess
        return self.backbone_meta.get("preprocess") or backbone_preprocess(self.arch)

    @property
    def arch(self) -> str:
        return self.backbone_meta.get("arch") or self.cfg.arch or "wrn28_4"

    def build_data(self, runtime: Runtime) -> Data:
        cfg, preprocess = self.cfg, self.preprocess
        train, val = make_loaders(cfg, cfg.task, self.split, self.dist, preprocess)
        device = use_device_loader(cfg, self.dist, preprocess)
        return Data(train, val, lambda epoch: set_loader_epoch(train, epoch),
                    {"loader": "device" if device else "workers", "preprocess": preprocess,
                     "images_on_device": getattr(train, "resident", None), "train_images": len(train.dataset),
                     "val_images": len(val.dataset)})

    def build_pipeline(self, runtime: Runtime, data: Data, model: nn.Module) -> ClassificationPipeline:
        return ClassificationPipeline(runtime.prec, data.eval, self.spec.num_classes)


class DecathlonTask(_Classification):
    """One decathlon task (``cfg.task``) learned on a frozen backbone into ``OUT/<task>``."""

    @property
    def out(self) -> Path:
        return Path(self.cfg.out) / self.cfg.task

    @property
    def split(self) -> str:
        return "train+val" if self.cfg.trainval else "train"

    def build_model(self, runtime, data) -> Tuple[nn.Module, Tuple[str, ...], Dict[str, Any]]:
        """The backbone file's network (``--method scratch``: ``--arch`` from random weights)
        with a fresh classifier."""
        cfg = self.cfg
        if self.backbone is not None:
            model = self.backbone
        else:
            model, self.backbone_meta = create_model(self.arch, self.spec.num_classes), {"source": "random"}
        reset_classifier(model, self.spec.num_classes)
        head = get_classifier(model)[0]
        self.backbone_sha = file_sha256(cfg.backbone) if cfg.backbone else None
        return model, (head,), {"arch": self.arch, "backbone_sha256": self.backbone_sha, "classifier": head}

    def announce(self, model, prepared, data, runtime, facts) -> str:
        return (f"{self.header}{self.method.name} on {self.arch} "
                f"({self.backbone_meta.get('source', self.cfg.backbone)}), {len(data.train.dataset)} train / "
                f"{len(data.eval.dataset)} val images, {prepared.trainable_values()} trainable values, "
                f"device {runtime.device}")

    def results(self, model, data, result, facts, pipeline):
        cfg, last = self.cfg, result.record
        meta = dict(task=cfg.task, arch=self.arch, method=self.method.name, num_classes=self.spec.num_classes,
                    epochs=cfg.epochs, trainval=cfg.trainval, val_top1=last["val_top1"], train_bn=cfg.train_bn,
                    backbone=cfg.backbone, backbone_sha256=self.backbone_sha)
        metrics = dict(meta, val_is_held_out=not cfg.trainval, val_count=last["val_count"],
                       train_top1=last["train_top1"], train_loss=last["train_loss"],
                       step_time_s=last["step_time_s"], collapse=result.collapse)
        return meta, metrics, f"{self.header}done: val top-1 {last['val_top1']:.2f}%"


class PretrainTask(_Classification):
    """The backbone trained on ``cfg.task`` (imagenet12): every weight trains with one
    optimizer; the artifact is the backbone file :func:`decathlon.models.open_backbone` reads."""

    method = None
    artifact = BACKBONE_FILE
    uses_masks = False
    no_mask_note = None

    def build_model(self, runtime, data):
        """Random ``--arch`` weights, or ``--backbone`` (e.g. imported weights to adapt to 64 x
        64 inputs) with a classifier of the task's classes."""
        cfg = self.cfg
        if self.backbone is None:
            model = create_model(self.arch, self.spec.num_classes)
        else:
            model = self.backbone
            if get_classifier(model)[1].out_features != self.spec.num_classes:
                reset_classifier(model, self.spec.num_classes)
        facts = {"arch": self.arch, "backbone_sha256": file_sha256(cfg.backbone) if cfg.backbone else None}
        return model, (), facts

    def prepare(self, model, head):
        from common.methods import Prepared
        return Prepared(main=list(model.parameters()), head=[])

    def build_optimizers(self, prepared, model) -> Dict[str, Any]:
        cfg = self.cfg
        return {"main": make_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       momentum=cfg.momentum)}

    def announce(self, model, prepared, data, runtime, facts) -> str:
        return (f"pretraining {self.arch} on {self.cfg.task}: {len(data.train.dataset)} train / "
                f"{len(data.eval.dataset)} val images, device {runtime.device}")

    def results(self, model, data, result, facts, pipeline):
        cfg, last = self.cfg, result.record
        self._meta = dict(task=cfg.task, epochs=cfg.epochs, val_top1=last["val_top1"], seed=cfg.seed,
                          resize=cfg.resize, crop=cfg.crop, preprocess=facts["preprocess"], arch=self.arch)
        metrics = {"task": cfg.task, "arch": self.arch, "num_classes": self.spec.num_classes, "epochs": cfg.epochs,
                   "val_top1": last["val_top1"], "val_count": last["val_count"], "train_top1": last["train_top1"],
                   "train_loss": last["train_loss"], "collapse": result.collapse}
        return self._meta, metrics, f"backbone written to {self.out / BACKBONE_FILE} (val top-1 {last['val_top1']:.2f}%)"

    def save(self, run: RunDir, model: nn.Module, meta: Mapping[str, Any]) -> Path:
        meta = dict(meta)
        return save_backbone(run.file(BACKBONE_FILE), model, meta.pop("arch"), **meta)
