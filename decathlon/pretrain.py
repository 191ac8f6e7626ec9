"""``python -m decathlon.pretrain``: train the shared backbone on imagenet12 (64 x 64).

The paper's ImageNet-trained WRN-28-4 cannot be downloaded, so this trains one from the
decathlon's own ImageNet split.  The run folder gets ``config.json``, ``log.jsonl``,
``checkpoint.pt`` (resumable: run the same command again), ``metrics.json`` and
``backbone.pt``, the file ``decathlon.train --backbone`` takes (weights, architecture and
validation top-1).  Multi-GPU: ``torchrun --nproc_per_node N -m decathlon.pretrain ...``.
"""
from __future__ import annotations

import sys
import time
from functools import partial
from typing import Any, Dict, Tuple

import torch.nn as nn

from common.amp import maybe_channels_last
from common.cli import run_config_cli
from common.config import build_parser
from common.distributed import DistInfo, cleanup, init_distributed
from common.heads import get_classifier, reset_classifier
from common.methods import make_optimizer
from common.runlog import RunDir, file_sha256
from common.runs import start_run
from common.seed import seed_everything
from decathlon.config import DecathlonPretrainConfig
from decathlon.engine import make_precision, train_classifier, use_compile
from decathlon.loaders import make_loaders, use_device_loader
from decathlon.models import create_model, open_backbone, save_backbone
from decathlon.tasks import get_task

__all__ = ["get_args_parser", "parse_config", "build_model", "pretrain", "main", "cli"]


def get_args_parser():
    return build_parser(DecathlonPretrainConfig, "Train a decathlon backbone on imagenet12 and write "
                                                 "OUT/backbone.pt for decathlon.train --backbone.")


def parse_config(argv=None) -> DecathlonPretrainConfig:
    return DecathlonPretrainConfig.from_cli(get_args_parser(), argv)


def build_model(cfg, num_classes: int, log) -> Tuple[nn.Module, str]:
    """Random ``--arch`` weights, or ``--backbone`` (e.g. imported weights to adapt to
    64 x 64 inputs) with a classifier of ``num_classes``; and the architecture."""
    if not cfg.backbone:
        arch = cfg.arch or "wrn28_4"
        return create_model(arch, num_classes), arch
    model, meta = open_backbone(cfg.backbone, cfg.arch, log=log)
    if get_classifier(model)[1].out_features != num_classes:
        reset_classifier(model, num_classes)
    return model, meta["arch"]


def pretrain(cfg: DecathlonPretrainConfig, dist: DistInfo) -> Dict[str, Any]:
    """Train (or resume) the backbone into ``cfg.out``; returns its metrics."""
    log = partial(print, flush=True) if dist.is_main else (lambda *_: None)
    run = RunDir(cfg.out, dist.is_main)
    run.check_run_folder()
    with run.lock():
        return _pretrain(run, cfg, dist, log)


def _pretrain(run: RunDir, cfg: DecathlonPretrainConfig, dist: DistInfo, log) -> Dict[str, Any]:
    seed_everything(cfg.seed, dist.rank)
    spec = get_task(cfg.task)
    prec = make_precision(cfg, dist)
    model, arch = build_model(cfg, spec.num_classes, log)
    model = maybe_channels_last(model.to(prec.device), prec.channels_last)
    optimizers = {"main": make_optimizer(cfg.optimizer, model.parameters(), lr=cfg.lr,
                                         weight_decay=cfg.weight_decay, momentum=cfg.momentum)}
    train_loader, val_loader = make_loaders(cfg, cfg.task, "train", dist)
    record = start_run(cfg, dist, arch=arch, amp=prec.amp, channels_last=prec.channels_last,
                       compile=use_compile(cfg, dist), loader="device" if use_device_loader(cfg, dist) else "workers",
                       images_on_device=getattr(train_loader, "resident", None),
                       backbone_sha256=file_sha256(cfg.backbone) if cfg.backbone else None,
                       train_images=len(train_loader.dataset), val_images=len(val_loader.dataset))
    log(f"pretraining {arch} on {cfg.task}: {len(train_loader.dataset)} train / "
        f"{len(val_loader.dataset)} val images, device {prec.device}")
    t0 = time.time()
    result = train_classifier(run, model, optimizers, cfg, dist=dist, prec=prec, train_loader=train_loader,
                              val_loader=val_loader, num_classes=spec.num_classes, config=record,
                              header=f"[{cfg.task}] ", log=log)
    return _finish(run, model, arch, cfg, spec, result, t0, log)


def _finish(run, model, arch, cfg, spec, result, t0, log) -> Dict[str, Any]:
    last = result.record
    metrics = {"task": cfg.task, "arch": arch, "num_classes": spec.num_classes,
               "epochs": cfg.epochs, "val_top1": last["val_top1"],
               "val_count": last["val_count"], "train_top1": last["train_top1"],
               "train_loss": last["train_loss"], "time_s": time.time() - t0, "collapse": result.collapse}
    if result.start_epoch >= len(result.history) and run.file("backbone.pt").is_file() \
            and run.file("metrics.json").is_file():
        log(f"already finished: {run.path} is unchanged")
        return run.read_json("metrics.json")
    if run.is_main:
        save_backbone(run.file("backbone.pt"), model, arch, task=cfg.task,
                      epochs=cfg.epochs, val_top1=last["val_top1"], seed=cfg.seed,
                      resize=cfg.resize, crop=cfg.crop)
    run.write_json("metrics.json", metrics)
    log(f"backbone written to {run.file('backbone.pt')} (val top-1 {last['val_top1']:.2f}%)")
    return metrics


def main(cfg: DecathlonPretrainConfig) -> Dict[str, Any]:
    dist = init_distributed(cfg.device, threads=cfg.threads, workers=cfg.workers)
    try:
        return pretrain(cfg, dist)
    finally:
        cleanup()


def cli(argv=None) -> int:
    return run_config_cli(lambda: parse_config(argv), main, DecathlonPretrainConfig.PROG)


if __name__ == "__main__":
    sys.exit(cli())
