"""``python -m decathlon.train``: learn one decathlon task (or all nine) on a frozen backbone.

For each task the run folder ``OUT/<task>/`` receives ``config.json``, ``log.jsonl`` (one
line per epoch), ``checkpoint.pt`` (rewritten after every epoch; the same command resumes
from it), then ``masks.safetensors`` (piggyback: bit-packed masks, new classifier, task
BN) or ``weights.safetensors`` (baselines), and ``metrics.json``.  The backbone file is
only read.  Multi-GPU: ``torchrun --nproc_per_node N -m decathlon.train ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Tuple

import torch.nn as nn

from common.accounting import sparsity
from common.amp import SWITCH_CHOICES, TRAIN_AMP_HELP, maybe_channels_last, resolve_switch
from common.cli import add_common_args, run_cli
from common.distributed import DistInfo, barrier, cleanup, init_distributed, make_sampler
from common.heads import get_classifier
from common.maskfile import RESERVED_KEYS, save_masks
from common.methods import add_mask_args, resolve_training_args
from common.runlog import RunDir, atomic_write_json, file_sha256
from common.seed import seed_everything
from common.weightsfile import save_weights_file
from decathlon.data import DecathlonDataset, build_loader, build_transforms
from decathlon.device_loader import DeviceBatches, SquareImages, images_fit_on_device
from decathlon.engine import COMPILE_CHOICES, make_precision, make_schedulers, train_classifier, use_compile
from decathlon.methods import METHODS, OPTIMIZERS, build_optimizers, get_method, replace_head
from decathlon.models import WEIGHTS_FORMAT, create_model, model_names, open_backbone
from decathlon.tasks import MASK_TASKS, TASK_NAMES, get_task

__all__ = ["get_args_parser", "main", "run_task", "make_loaders", "make_precision",
           "make_schedulers", "file_sha256", "absolute_paths", "DATA_ROOT_ENV", "DEFAULT_DATA_ROOT"]

DATA_ROOT_ENV = "DECATHLON_ROOT"
DEFAULT_DATA_ROOT = "data/decathlon-1.0"
_SWITCH = SWITCH_CHOICES
_MASK_FLAGS = ("threshold", "mask_init", "mask_scale", "mask_spread")
# Paths whose content is identified otherwise (the backbone by its SHA-256): a resumed
# run may find the file elsewhere.
MAY_CHANGE_ON_RESUME = ("backbone",)


def add_data_args(p: argparse.ArgumentParser) -> None:
    """Augmentation, cache and runtime flags shared with decathlon.pretrain."""
    g = p.add_argument_group("data and runtime")
    g.add_argument("--resize", type=int, default=72,
                   help="the whole image is resized to a square of this many px (default: 72)")
    g.add_argument("--crop", type=int, default=64,
                   help="crop size fed to the network: random at train, centre at eval (default: 64)")
    g.add_argument("--hflip", choices=_SWITCH, default="auto",
                   help="random horizontal flips at train time; auto = per task (off for "
                        "gtsrb, omniglot, svhn) (default: auto)")
    g.add_argument("--scale", type=float, nargs=2, default=(1.0, 1.0), metavar=("LO", "HI"),
                   help="random rescale of the whole image by a factor in [LO, HI] before "
                        "cropping (default: 1 1, i.e. off)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="keep decoded images in uint8 memory-mapped files here, so epochs "
                        "after the first decode no JPEG (default: off)")
    g.add_argument("--amp", choices=_SWITCH, default="auto", help=TRAIN_AMP_HELP)
    g.add_argument("--channels-last", choices=_SWITCH, default="auto",
                   help="channels_last memory format; auto = on where the network is compiled on a "
                        "CUDA device (1.06x the images/s of NCHW at batch 32 under CUDA graphs on an "
                        "H100; MNIST top-1 unchanged), off otherwise (default: auto)")
    g.add_argument("--compile", choices=COMPILE_CHOICES, default="auto",
                   help="torch.compile the network for training and evaluation, once per run: on "
                        "(default mode), cudagraphs (mode reduce-overhead: CUDA graphs), off; auto "
                        "= cudagraphs on one CUDA device (on an H100, decathlon.train end to end: "
                        "2.5x the default mode's images/s at batch 32, 2.0x at 128), on across "
                        "processes, off for the CPU (default: auto)")
    g.add_argument("--loader", choices=("auto", "workers", "device"), default="auto",
                   help="device: every image resized once to --resize px into one uint8 array (in "
                        "--cache-dir when given), batches gathered on the device (see "
                        "--images-on-device) or by a background thread, and cropped, flipped and "
                        "normalised on the device; workers: DataLoader "
                        "workers decode and augment on the CPU (needed for --scale); auto = "
                        "device on CUDA unless --scale is set (default: auto)")
    g.add_argument("--images-on-device", choices=_SWITCH, default="auto",
                   help="with --loader device: copy the resized uint8 images to the device once "
                        "and gather every batch there, with no host thread and no copy per batch "
                        "(on an H100, 120-210 us of host time per batch against 430-720 us "
                        "gathered on the host; BENCHMARKS-gpu.md); auto = on when the train and "
                        "val images take at most a quarter of the device's free memory (the "
                        "training images of the nine 72 px tasks besides imagenet12: 2.7 GB) "
                        "(default: auto)")
    g.add_argument("--print-freq", type=int, default=50,
                   help="steps between progress lines, and between the loss checks (non-finite "
                        "loss, collapse) that read the device (default: 50)")


SEED_HELP = ("random seed of initialisation, data order and augmentation; augmentation is "
             "drawn per sample from (seed, epoch, index), so it does not depend on the number "
             "of processes or workers (default: 0)")


def override_help(p: argparse.ArgumentParser, helps: Dict[str, str]) -> None:
    """Replace the help of shared flags whose meaning this command makes precise."""
    helps = dict(helps, seed=SEED_HELP)
    for action in p._actions:
        action.help = helps.get(action.dest, action.help)


def check_data_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse inconsistent values of the flags added by :func:`add_data_args`."""
    if args.crop > args.resize:
        p.error(f"--crop {args.crop} must not exceed --resize {args.resize}")
    if not 0 < args.scale[0] <= args.scale[1]:
        p.error(f"--scale {args.scale[0]} {args.scale[1]}: need 0 < LO <= HI")
    if args.print_freq < 1:
        p.error("--print-freq must be >= 1")
    if args.loader == "device" and tuple(args.scale) != (1.0, 1.0):
        p.error("--loader device does not rescale images: drop --scale or use --loader workers")
    if args.images_on_device == "on" and args.loader == "workers":
        p.error("--images-on-device on needs --loader device (or auto)")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m decathlon.train",
        description="Train a piggyback mask (or a baseline) for Visual Decathlon tasks on a "
                    "frozen backbone from decathlon.pretrain.")
    add_common_args(p, data_root_env=DATA_ROOT_ENV, default_data_root=DEFAULT_DATA_ROOT,
                    default_epochs=60, default_batch_size=32, default_arch="wrn28_4",
                    default_out="runs/decathlon")
    # The architecture comes from the backbone file; --arch only checks it (or picks the
    # network for --method scratch and for external weights).
    p.set_defaults(arch=None)
    helps = {"arch": f"network of --method scratch and of external --backbone weights; for a "
                     f"decathlon.pretrain backbone it is read from the file and --arch, if "
                     f"given, must agree ({', '.join(model_names())}; default: wrn28_4)",
             "backbone": "backbone file from python -m decathlon.pretrain, or an external WRN "
                         "state dict (imported by key mapping); required except for "
                         "--method scratch; only read, never modified",
             "out": "output folder; each task's run folder is OUT/<task> (config.json, "
                    "log.jsonl, checkpoint.pt, mask or weights file, metrics.json) "
                    "(default: runs/decathlon)"}
    override_help(p, helps)
    p.add_argument("--task", required=True, choices=list(TASK_NAMES) + ["all"], metavar="TASK",
                   help=f"task to learn, or 'all' for the nine non-ImageNet tasks in turn; "
                        f"one of: {', '.join(TASK_NAMES)}, all")
    p.add_argument("--method", default="piggyback", choices=list(METHODS),
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
                   + " (default: piggyback)")
    p.add_argument("--trainval", action="store_true",
                   help="train on train+val (for final models; val top-1 is then not held out)")
    m = add_mask_args(p)
    m.add_argument("--ternary", action="store_true",
                   help="ternary masks {-1, 0, 1} (cut-offs at +-threshold) instead of binary")
    m.add_argument("--train-bn", action="store_true",
                   help="train task-specific BN layers (saved with the mask); piggyback and "
                        "feature only")
    o = p.add_argument_group("optimisation")
    o.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS),
                   help="optimiser of the masks / backbone weights (default: piggyback from "
                        "--recipe, " + ", ".join(f"{k} {v.optimizer}" for k, v in METHODS.items()
                                                 if v.optimizer) + ")")
    o.add_argument("--lr", type=float, default=None,
                   help="learning rate of the masks / backbone weights (default: piggyback from "
                        "--recipe, " + ", ".join(f"{k} {v.lr:g}" for k, v in METHODS.items()
                                                 if v.lr) + ")")
    o.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay of the masks / backbone weights (default: per method)")
    o.add_argument("--head-optimizer", default="adam", choices=list(OPTIMIZERS),
                   help="optimiser of the new classifier and task BN (default: adam)")
    o.add_argument("--head-lr", type=float, default=1e-3,
                   help="learning rate of the new classifier and task BN (default: 1e-3)")
    o.add_argument("--head-weight-decay", type=float, default=0.0,
                   help="weight decay of the new classifier and task BN (default: 0)")
    o.add_argument("--lr-steps", type=int, nargs="*", default=[45], metavar="EPOCH",
                   help="epochs after which every learning rate is multiplied by --lr-gamma "
                        "(default: 45)")
    o.add_argument("--lr-gamma", type=float, default=0.1,
                   help="learning-rate decay factor (default: 0.1)")
    add_data_args(p)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse conflicting flags; fill in the defaults of the method and the recipe."""
    method = get_method(args.method)
    if args.ternary and method.name != "piggyback":
        p.error("--ternary needs --method piggyback")
    if args.train_bn and not method.supports_train_bn:
        p.error(f"--train-bn: BN layers already train with --method {method.name}")
    if method.needs_backbone and not args.backbone:
        p.error(f"--method {method.name} needs --backbone (a file from python -m decathlon.pretrain "
                f"or an external WRN state dict)")
    if not method.needs_backbone and args.backbone:
        p.error("--method scratch starts from random weights; drop --backbone")
    if method.name == "feature" and (args.lr is not None or args.optimizer or args.weight_decay is not None):
        p.error("--method feature trains only the classifier: use --head-lr/--head-optimizer")
    given = [f"--{k.replace('_', '-')}" for k in _MASK_FLAGS if getattr(args, k) is not None]
    if not method.uses_masks and given:
        p.error(f"{', '.join(given)} only apply to --method piggyback")
    if args.arch is not None and args.arch not in model_names():
        p.error(f"--arch {args.arch!r} is unknown; valid: {', '.join(model_names())}")
    check_data_args(p, args)
    resolve_training_args(args, method.uses_masks, {"optimizer": method.optimizer, "lr": method.lr,
                                                    "weight_decay": method.weight_decay}, p.error)
    return args


def absolute_paths(config: Dict[str, Any], keys) -> Dict[str, Any]:
    """``config`` with the paths under ``keys`` made absolute (where set), so that files a
    run writes are found from any working directory."""
    return dict(config, **{k: os.path.abspath(config[k]) for k in keys if config.get(k)})


def make_loaders(args, task: str, train_split: str, dist: DistInfo):
    """Train and val loaders of ``task``; rank 0 builds first so that it alone creates
    the decoded-image cache files."""
    hflip = None if args.hflip == "auto" else args.hflip == "on"
    tf = dict(resize=args.resize, crop=args.crop)

    def build():
        tr = DecathlonDataset(args.data_root, task, train_split, cache_dir=args.cache_dir,
                              seed=args.seed, transform=build_transforms(
                                  task, True, hflip=hflip, scale=tuple(args.scale), **tf))
        va = DecathlonDataset(args.data_root, task, "val", cache_dir=args.cache_dir,
                              transform=build_transforms(task, False, **tf))
        return tr, va

    if not dist.is_main:
        barrier()
    train_set, val_set = build()
    if dist.is_main:
        barrier()
    if use_device_loader(args, dist):
        return device_loaders(args, train_set, val_set, dist, hflip)
    pin = dist.device.type == "cuda"
    common = dict(batch_size=args.batch_size, workers=args.workers, dist_info=dist,
                  seed=args.seed, pin_memory=pin)
    return build_loader(train_set, train=True, **common), build_loader(val_set, train=False, **common)


def use_device_loader(args, dist: DistInfo) -> bool:
    """``--loader``: auto = the device loader on CUDA when no random rescaling is asked for."""
    if args.loader != "auto":
        return args.loader == "device"
    return dist.device.type == "cuda" and tuple(args.scale) == (1.0, 1.0)


def device_loaders(args, train_set, val_set, dist: DistInfo, hflip):
    """Train and val batches augmented on the device (decathlon.device_loader); rank 0 fills
    the square-image arrays first."""
    spec = train_set.spec

    def square(ds):
        plain = DecathlonDataset(args.data_root, ds.task, ds.split, cache_dir=args.cache_dir)
        return SquareImages(plain, args.resize, cache_dir=args.cache_dir, workers=args.workers,
                            log=print if dist.is_main else (lambda *_: None))

    if not dist.is_main:
        barrier()
    images = square(train_set), square(val_set)
    if dist.is_main:
        barrier()
    resident = resolve_switch(args.images_on_device, images_fit_on_device(images, dist.device))
    if resident and dist.is_main:
        size = sum(im.nbytes for im in images) / 2 ** 20
        print(f"{train_set.task}: the square images ({size:.0f} MiB) are kept on {dist.device}")
    common = dict(batch_size=args.batch_size, crop=args.crop, mean=spec.mean, std=spec.std, device=dist.device,
                  seed=args.seed, rank=dist.rank, resident=resident)
    flips = spec.hflip if hflip is None else hflip
    return (DeviceBatches(images[0], train_set, train=True, hflip=flips,
                          sampler=make_sampler(train_set, dist, shuffle=True, seed=args.seed), **common),
            DeviceBatches(images[1], val_set, train=False, hflip=False,
                          sampler=make_sampler(val_set, dist, shuffle=False, seed=args.seed), **common))




def _build_model(args, task: str, log) -> Tuple[nn.Module, str, dict]:
    spec = get_task(task)
    if args.backbone:
        model, meta = open_backbone(args.backbone, args.arch, log=log)
        arch = meta["arch"]
    else:
        arch = args.arch or "wrn28_4"
        model, meta = create_model(arch, spec.num_classes), {"arch": arch, "source": "random"}
    return replace_head(model, spec.num_classes), arch, meta


def run_task(args, task: str, dist: DistInfo) -> Dict[str, Any]:
    """Train (or resume) one task into ``OUT/<task>`` and return its metrics."""
    log = partial(print, flush=True) if dist.is_main else (lambda *_: None)
    run = RunDir(Path(args.out) / task, dist.is_main)
    method = get_method(args.method)
    spec = get_task(task)
    seed_everything(args.seed, dist.rank)
    model, arch, backbone_meta = _build_model(args, task, log)
    prepared = method.prepare(model, args)
    prec = make_precision(args, dist)
    model = maybe_channels_last(model.to(prec.device), prec.channels_last)
    optimizers = build_optimizers(prepared, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                                  head_optimizer=args.head_optimizer, head_lr=args.head_lr,
                                  head_weight_decay=args.head_weight_decay)
    train_loader, val_loader = make_loaders(args, task, "train+val" if args.trainval else "train", dist)
    backbone_sha = file_sha256(args.backbone) if args.backbone else None
    config = absolute_paths({k: v for k, v in vars(args).items() if k != "task"},
                            ("data_root", "out", "cache_dir", "backbone"))
    config.update(task=task, arch=arch, world_size=dist.world_size, backbone_sha256=backbone_sha,
                  amp_used=prec.amp, channels_last_used=prec.channels_last,
                  compile_used=use_compile(args, dist), classifier=get_classifier(model)[0],
                  train_images=len(train_loader.dataset), val_images=len(val_loader.dataset))
    log(f"[{task}] {method.name} on {arch} ({backbone_meta.get('source', config['backbone'])}), "
        f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} val images, "
        f"{sum(p.numel() for p in prepared.main + prepared.head)} trainable values, device {prec.device}")
    t0 = time.time()
    result = train_classifier(run, model, optimizers, args, dist=dist, prec=prec, train_loader=train_loader,
                              val_loader=val_loader, num_classes=spec.num_classes, config=config,
                              frozen_modules=prepared.frozen_modules, may_change=MAY_CHANGE_ON_RESUME,
                              header=f"[{task}] ", log=log)
    last = result.record
    meta = dict(task=task, arch=arch, method=method.name, num_classes=spec.num_classes,
                epochs=args.epochs, trainval=args.trainval, val_top1=last["val_top1"],
                train_bn=args.train_bn, backbone=config["backbone"], backbone_sha256=backbone_sha)
    metrics = dict(meta, val_is_held_out=not args.trainval, val_count=last["val_count"],
                   train_top1=last["train_top1"], train_loss=last["train_loss"],
                   step_time_s=last["step_time_s"], time_s=time.time() - t0, collapse=result.collapse)
    if dist.is_main:
        if method.uses_masks:
            # the mask file records train_bn (and the other conversion settings) itself
            save_masks(model, run.file("masks.safetensors"), **{k: v for k, v in meta.items()
                                                                 if k not in RESERVED_KEYS})
            metrics.update(sparsity=sparsity(model)["total"], result_file="masks.safetensors")
        else:
            save_weights_file(run.file("weights.safetensors"), model, format=WEIGHTS_FORMAT, **meta)
            metrics.update(sparsity=None, result_file="weights.safetensors",
                           note=f"--method {method.name} trains no mask: full weights saved")
    run.write_json("metrics.json", metrics)
    log(f"[{task}] done: val top-1 {metrics['val_top1']:.2f}%"
        + (f", mask sparsity {metrics['sparsity']:.4f}" if metrics.get("sparsity") is not None else "")
        + (f"; COLLAPSE at step {result.collapse['step']}" if result.collapse else "")
        + f"; results in {run.path}")
    return metrics


def main(args: argparse.Namespace) -> Dict[str, Any]:
    dist = init_distributed(args.device)
    try:
        tasks = list(MASK_TASKS) if args.task == "all" else [args.task]
        results = {task: run_task(args, task, dist) for task in tasks}
        if len(tasks) > 1 and dist.is_main:
            atomic_write_json(Path(args.out) / "summary.json", results)
        return results
    finally:
        cleanup()


def cli(argv=None) -> int:
    return run_cli(get_args_parser(), main, argv, check_args)


if __name__ == "__main__":
    sys.exit(cli())
