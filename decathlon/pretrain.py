"""``python -m decathlon.pretrain``: train the shared backbone on imagenet12 (64 x 64).

The paper's ImageNet-trained WRN-28-4 cannot be downloaded, so this trains one from the
decathlon's own ImageNet split.  The run folder gets ``config.json``, ``log.jsonl``,
``checkpoint.pt`` (resumable: run the same command again), ``metrics.json`` and
``backbone.pt``, the file ``decathlon.train --backbone`` takes (weights, architecture and
validation top-1).  Multi-GPU: ``torchrun --nproc_per_node N -m decathlon.pretrain ...``.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from typing import Any, Dict

import torch.nn as nn

from common.amp import maybe_channels_last
from common.cli import add_common_args, run_cli
from common.distributed import DistInfo, cleanup, init_distributed
from common.heads import get_classifier
from common.methods import OPTIMIZERS, make_optimizer
from common.runlog import RunDir
from common.seed import seed_everything
from decathlon.engine import make_precision, train_classifier, use_compile
from decathlon.methods import replace_head
from decathlon.models import create_model, model_names, open_backbone, save_backbone
from decathlon.tasks import SOURCE_TASK, TASK_NAMES, get_task
from decathlon.train import (DATA_ROOT_ENV, DEFAULT_DATA_ROOT, MAY_CHANGE_ON_RESUME, absolute_paths,
                             add_data_args, check_data_args, file_sha256, make_loaders, override_help)

__all__ = ["get_args_parser", "check_args", "build_model", "pretrain", "main"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m decathlon.pretrain",
        description="Train a decathlon backbone on imagenet12 and write OUT/backbone.pt "
                    "for decathlon.train --backbone.")
    add_common_args(p, data_root_env=DATA_ROOT_ENV, default_data_root=DEFAULT_DATA_ROOT,
                    default_epochs=40, default_batch_size=256, default_arch="wrn28_4",
                    default_out="runs/pretrain")
    override_help(p, {"backbone": "start from these weights instead of random ones: a "
                                  "decathlon.pretrain backbone.pt, or an external WRN state "
                                  "dict imported by key mapping (default: random init)",
                      "arch": f"network to train: one of {', '.join(model_names())} (default: "
                              f"wrn28_4; with --backbone, the file's architecture)"})
    p.set_defaults(arch=None)
    p.add_argument("--task", default=SOURCE_TASK, choices=TASK_NAMES, metavar="TASK",
                   help=f"task to train the backbone on (default: {SOURCE_TASK})")
    p.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS),
                   help="optimiser (sgd has momentum 0.9) (default: sgd)")
    p.add_argument("--lr", type=float, default=0.1, help="base learning rate (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=5e-4,
                   help="weight decay (default: 5e-4)")
    p.add_argument("--lr-steps", type=int, nargs="*", default=None, metavar="EPOCH",
                   help="epochs after which the learning rate is multiplied by --lr-gamma "
                        "(default: at 50%% and 75%% of --epochs)")
    p.add_argument("--lr-gamma", type=float, default=0.1,
                   help="learning-rate decay factor (default: 0.1)")
    add_data_args(p)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.arch is not None and args.arch not in model_names():
        p.error(f"--arch {args.arch!r} is unknown; valid: {', '.join(model_names())}")
    check_data_args(p, args)
    if args.lr_steps is None:
        args.lr_steps = sorted({max(1, args.epochs // 2), max(1, args.epochs * 3 // 4)})
    return args


def build_model(args, num_classes: int, log) -> nn.Module:
    """Random ``--arch`` weights, or ``--backbone`` (e.g. imported weights to adapt to
    64 x 64 inputs) with a classifier of ``num_classes``; sets ``args.arch``."""
    if not args.backbone:
        args.arch = args.arch or "wrn28_4"
        return create_model(args.arch, num_classes)
    model, meta = open_backbone(args.backbone, args.arch, log=log)
    args.arch = meta["arch"]
    return model if get_classifier(model)[1].out_features == num_classes else replace_head(model, num_classes)


def pretrain(args: argparse.Namespace, dist: DistInfo) -> Dict[str, Any]:
    """Train (or resume) the backbone into ``args.out``; returns its metrics."""
    log = partial(print, flush=True) if dist.is_main else (lambda *_: None)
    run = RunDir(args.out, dist.is_main)
    seed_everything(args.seed, dist.rank)
    spec = get_task(args.task)
    prec = make_precision(args, dist)
    model = build_model(args, spec.num_classes, log)
    model = maybe_channels_last(model.to(prec.device), prec.channels_last)
    optimizers = {"main": make_optimizer(args.optimizer, model.parameters(), lr=args.lr,
                                         weight_decay=args.weight_decay)}
    train_loader, val_loader = make_loaders(args, args.task, "train", dist)
    config = absolute_paths(vars(args), ("data_root", "out", "cache_dir", "backbone"))
    config.update(world_size=dist.world_size, amp_used=prec.amp, channels_last_used=prec.channels_last,
                  compile_used=use_compile(args, dist),
                  backbone_sha256=file_sha256(args.backbone) if args.backbone else None,
                  train_images=len(train_loader.dataset), val_images=len(val_loader.dataset))
    log(f"pretraining {args.arch} on {args.task}: {len(train_loader.dataset)} train / "
        f"{len(val_loader.dataset)} val images, device {prec.device}")
    t0 = time.time()
    result = train_classifier(run, model, optimizers, args, dist=dist, prec=prec, train_loader=train_loader,
                              val_loader=val_loader, num_classes=spec.num_classes, config=config,
                              may_change=MAY_CHANGE_ON_RESUME, header=f"[{args.task}] ", log=log)
    last = result.record
    metrics = {"task": args.task, "arch": args.arch, "num_classes": spec.num_classes,
               "epochs": args.epochs, "val_top1": last["val_top1"],
               "val_count": last["val_count"], "train_top1": last["train_top1"],
               "train_loss": last["train_loss"], "time_s": time.time() - t0, "collapse": result.collapse}
    if dist.is_main:
        save_backbone(run.file("backbone.pt"), model, args.arch, task=args.task,
                      epochs=args.epochs, val_top1=last["val_top1"], seed=args.seed,
                      resize=args.resize, crop=args.crop)
    run.write_json("metrics.json", metrics)
    log(f"backbone written to {run.file('backbone.pt')} (val top-1 {last['val_top1']:.2f}%)")
    return metrics


def main(args: argparse.Namespace) -> Dict[str, Any]:
    dist = init_distributed(args.device)
    try:
        return pretrain(args, dist)
    finally:
        cleanup()


def cli(argv=None) -> int:
    return run_cli(get_args_parser(), main, argv, check_args)


if __name__ == "__main__":
    sys.exit(cli())
