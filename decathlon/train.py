"""``python -m decathlon.train``: learn one decathlon task (or all nine) on a frozen backbone.

For each task the run folder ``OUT/<task>/`` receives ``config.json``, ``log.jsonl`` (one
line per epoch), ``checkpoint.pt`` (rewritten after every epoch; the same command resumes
from it), then the method's artifact (``masks.safetensors`` for piggyback: bit-packed
masks, new classifier, task BN; ``weights.safetensors`` for the baselines) and
``metrics.json``. The backbone file is only read. Multi-GPU:
``torchrun --nproc_per_node N -m decathlon.train ...``.
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Tuple

import torch.nn as nn

from common.amp import maybe_channels_last
from common.cli import run_config_cli
from common.config import build_parser
from common.distributed import DistInfo, cleanup, init_distributed
from common.heads import get_classifier, reset_classifier
from common.methods import build_optimizers, get_method
from common.runlog import RunDir, atomic_write_json, file_sha256
from common.seed import seed_everything
from common.runs import finish_task, start_run
from decathlon.config import DecathlonTrainConfig
from decathlon.engine import make_precision, train_classifier, use_compile
from decathlon.loaders import make_loaders, use_device_loader
from decathlon.models import create_model, open_backbone
from decathlon.tasks import MASK_TASKS, get_task

__all__ = ["get_args_parser", "parse_config", "main", "cli", "run_task", "build_model"]


def get_args_parser():
    return build_parser(DecathlonTrainConfig, "Train a piggyback mask (or a baseline) for Visual Decathlon "
                                              "tasks on a frozen backbone from decathlon.pretrain.")


def parse_config(argv=None) -> DecathlonTrainConfig:
    return DecathlonTrainConfig.from_cli(get_args_parser(), argv)


def build_model(cfg, task: str, log) -> Tuple[nn.Module, str, dict]:
    """The task's network with a fresh classifier: the backbone file's, or ``--arch`` from
    random weights (``--method scratch``)."""
    spec = get_task(task)
    if cfg.backbone:
        model, meta = open_backbone(cfg.backbone, cfg.arch, log=log)
        arch = meta["arch"]
    else:
        arch = cfg.arch or "wrn28_4"
        model, meta = create_model(arch, spec.num_classes), {"arch": arch, "source": "random"}
    reset_classifier(model, spec.num_classes)
    return model, arch, meta


def run_task(cfg: DecathlonTrainConfig, task: str, dist: DistInfo) -> Dict[str, Any]:
    """Train (or resume) one task into ``OUT/<task>`` and return its metrics."""
    log = partial(print, flush=True) if dist.is_main else (lambda *_: None)
    cfg = cfg.replace(task=task) if cfg.task != task else cfg
    run = RunDir(Path(cfg.out) / task, dist.is_main)
    run.check_run_folder()
    with run.lock():
        return _run_task(run, cfg, task, dist, log)


def _run_task(run: RunDir, cfg: DecathlonTrainConfig, task: str, dist: DistInfo, log) -> Dict[str, Any]:
    method = get_method(cfg.method)
    spec = get_task(task)
    seed_everything(cfg.seed, dist.rank)
    model, arch, backbone_meta = build_model(cfg, task, log)
    prepared = method.prepare(model, head=(get_classifier(model)[0],), masks=cfg.mask_settings(),
                              train_bn=cfg.train_bn)
    prec = make_precision(cfg, dist)
    model = maybe_channels_last(model.to(prec.device), prec.channels_last)
    optimizers = build_optimizers(prepared, cfg)
    train_loader, val_loader = make_loaders(cfg, task, "train+val" if cfg.trainval else "train", dist)
    backbone_sha = file_sha256(cfg.backbone) if cfg.backbone else None
    record = start_run(cfg, dist, arch=arch, backbone_sha256=backbone_sha, amp=prec.amp,
                       channels_last=prec.channels_last, compile=use_compile(cfg, dist),
                       loader="device" if use_device_loader(cfg, dist) else "workers",
                       images_on_device=getattr(train_loader, "resident", None),
                       classifier=get_classifier(model)[0], train_images=len(train_loader.dataset),
                       val_images=len(val_loader.dataset))
    log(f"[{task}] {method.name} on {arch} ({backbone_meta.get('source', cfg.backbone)}), "
        f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val images, "
        f"{prepared.trainable_values()} trainable values, device {prec.device}")
    t0 = time.time()
    result = train_classifier(run, model, optimizers, cfg, dist=dist, prec=prec, train_loader=train_loader,
                              val_loader=val_loader, num_classes=spec.num_classes, config=record,
                              frozen_modules=prepared.frozen_modules, header=f"[{task}] ", log=log)
    last = result.record
    meta = dict(task=task, arch=arch, method=method.name, num_classes=spec.num_classes,
                epochs=cfg.epochs, trainval=cfg.trainval, val_top1=last["val_top1"],
                train_bn=cfg.train_bn, backbone=cfg.backbone, backbone_sha256=backbone_sha)
    metrics = dict(meta, val_is_held_out=not cfg.trainval, val_count=last["val_count"],
                   train_top1=last["train_top1"], train_loss=last["train_loss"],
                   step_time_s=last["step_time_s"], collapse=result.collapse)
    metrics = finish_task(run, model, method, meta, metrics, result, started=t0, log=log,
                          summary=f"[{task}] done: val top-1 {last['val_top1']:.2f}%")
    return metrics


def main(cfg: DecathlonTrainConfig) -> Dict[str, Any]:
    dist = init_distributed(cfg.device, threads=cfg.threads, workers=cfg.workers)
    try:
        tasks = list(MASK_TASKS) if cfg.task == "all" else [cfg.task]
        results = {task: run_task(cfg, task, dist) for task in tasks}
        if len(tasks) > 1 and dist.is_main:
            atomic_write_json(Path(cfg.out) / "summary.json", results)
        return results
    finally:
        cleanup()


def cli(argv=None) -> int:
    return run_config_cli(lambda: parse_config(argv), main, DecathlonTrainConfig.PROG)


if __name__ == "__main__":
    sys.exit(cli())
