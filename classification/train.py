"""``python -m classification.train``: the paper's section 4 setting. A new classification
task on an ImageNet-trained torchvision or timm network, by piggyback masks or one of
the paper's baselines, over an ImageFolder tree.

The run folder ``--out`` receives ``config.json``, ``log.jsonl`` (one line per epoch),
``checkpoint.pt`` (after every epoch; the same command resumes from it),
``masks.safetensors`` (piggyback: packed masks, new classifier, task BN) or
``weights.safetensors`` (baselines), ``metrics.json`` (top-1 on the evaluation split, mask
sparsity in total and per layer, collapse if any) and the pictures ``curves.png`` and
``sparsity.png`` (weights masked out per layer, the paper's Fig. 3). The weight file is
only read. Multi-GPU: ``torchrun --nproc_per_node N -m classification.train ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from common.accounting import sparsity
from common.amp import SWITCH_CHOICES, TRAIN_AMP_HELP, Precision, default_channels_last, maybe_channels_last, \
    resolve_switch
from common.classify import ClassificationPipeline
from common.cli import add_common_args, run_cli
from common.distributed import DistInfo, barrier, cleanup, init_distributed
from common.engine import FitState, compile_model, fit
from common.errors import UsageError
from common.maskfile import RESERVED_KEYS, save_masks
from common.methods import METHODS, OPTIMIZERS, build_optimizers, get_method, add_mask_args, resolve_training_args
from common.plots import save_run_plots
from common.runlog import RunDir, file_sha256
from common.seed import seed_everything
from common.weightsfile import save_weights_file
from classification.data import ClassificationTransform, ImageFolderDataset, build_loader, set_loader_epoch
from classification.models import create_model
from classification.weights import read_safetensors_metadata, resolve_weights

__all__ = ["get_args_parser", "check_args", "main", "cli", "train", "file_sha256", "WEIGHTS_FORMAT",
           "DATA_ROOT_ENV"]

DATA_ROOT_ENV = "CLASSIFICATION_ROOT"
WEIGHTS_FORMAT = "classification-weights"
_MASK_FLAGS = ("threshold", "mask_init", "mask_scale", "mask_spread")
# The weight file is identified by its SHA-256: a resumed run may find it elsewhere.
MAY_CHANGE_ON_RESUME = ("backbone",)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m classification.train",
        description="Learn a new classification task on a frozen ImageNet network with a piggyback "
                    "mask (or a baseline of the paper's Table 2) over an ImageFolder tree "
                    "DIR/train/<class>/*, DIR/test/<class>/* (or val/).")
    add_common_args(p, data_root_env=DATA_ROOT_ENV, default_data_root="data/classification",
                    default_epochs=30, default_batch_size=32, default_arch="mobilenet_v2",
                    default_out="runs/classification")
    p.set_defaults(arch=None)
    for action in p._actions:
        if action.dest == "arch":
            action.help = ("torchvision name (resnet50, vgg16, mobilenet_v2 ...) or timm name "
                           "(timm:NAME, or a bare name torchvision lacks); default: the 'arch' "
                           "recorded in a safetensors --weights file")
        elif action.dest == "backbone":
            action.help = "same as --weights"
    p.add_argument("--weights", dest="backbone", metavar="FILE",
                   help="local ImageNet weight file of --arch (.pth/.pt/.bin/.safetensors): a path, a "
                        "file name in $TORCH_HOME/hub/checkpoints, or 'imagenet' for torchvision's "
                        "default file there; nothing is downloaded. Required except for --method scratch")
    p.add_argument("--method", default="piggyback", choices=list(METHODS),
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + " (default: piggyback)")
    p.add_argument("--train-bn", action="store_true",
                   help="task-specific batch-norm layers that train (saved with the mask); piggyback "
                        "and feature only")
    m = add_mask_args(p)
    m.add_argument("--ternary", action="store_true", help="ternary masks {-1, 0, 1} instead of binary")
    o = p.add_argument_group("optimisation (paper: 30 epochs, learning rates /10 after 15)")
    o.add_argument("--optimizer", default=None, choices=list(OPTIMIZERS),
                   help="optimiser of the masks / backbone weights (default: piggyback from --recipe, "
                        + ", ".join(f"{k} {v.optimizer}" for k, v in METHODS.items() if v.optimizer) + ")")
    o.add_argument("--lr", type=float, default=None,
                   help="learning rate of the masks / backbone weights (default: piggyback from --recipe, "
                        + ", ".join(f"{k} {v.lr:g}" for k, v in METHODS.items() if v.lr) + ")")
    o.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay of the masks / backbone weights (default: per method)")
    o.add_argument("--head-optimizer", default="adam", choices=list(OPTIMIZERS),
                   help="optimiser of the new classifier and task BN (default: adam)")
    o.add_argument("--head-lr", type=float, default=1e-3,
                   help="learning rate of the new classifier and task BN (default: 1e-3)")
    o.add_argument("--head-weight-decay", type=float, default=0.0,
                   help="weight decay of the new classifier and task BN (default: 0)")
    o.add_argument("--lr-steps", type=int, nargs="*", default=[15], metavar="EPOCH",
                   help="epochs after which every learning rate is multiplied by --lr-gamma (default: 15)")
    o.add_argument("--lr-gamma", type=float, default=0.1, help="learning-rate decay factor (default: 0.1)")
    d = p.add_argument_group("data (paper: 224 px, random resized crops and flips)")
    d.add_argument("--size", type=int, default=224, help="input size in px (default: 224)")
    d.add_argument("--eval-resize", type=int, default=None,
                   help="evaluation: shorter side resized to this, then the centre --size crop "
                        "(default: round(size * 256 / 224))")
    d.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("LO", "HI"),
                   help="training crops cover a random fraction in [LO, HI] of the image area "
                        "(default: 0.08 1; 1 1 = the whole image)")
    d.add_argument("--hflip", choices=("on", "off"), default="on",
                   help="random horizontal flips at training time (default: on)")
    d.add_argument("--eval-split", choices=("auto", "test", "val"), default="auto",
                   help="split scored after every epoch; auto = test/ if present, else val/ (default: auto)")
    d.add_argument("--train-limit", type=int, default=None, metavar="N",
                   help="train on a class-balanced subset of N images (default: all)")
    d.add_argument("--eval-limit", type=int, default=None, metavar="N",
                   help="evaluate on a class-balanced subset of N images (default: all)")
    r = p.add_argument_group("runtime")
    r.add_argument("--amp", choices=SWITCH_CHOICES, default="auto", help=TRAIN_AMP_HELP)
    r.add_argument("--channels-last", choices=SWITCH_CHOICES, default="auto",
                   help="channels_last memory format; auto = on for CUDA (default: auto)")
    r.add_argument("--compile", choices=SWITCH_CHOICES, default="auto",
                   help="torch.compile the network once per run; auto = on for CUDA (default: auto)")
    r.add_argument("--print-freq", type=int, default=50,
                   help="steps between progress lines and loss checks (default: 50)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse conflicting flags; fill in the defaults of the method and the recipe."""
    method = get_method(args.method)
    if args.ternary and not method.uses_masks:
        p.error("--ternary needs --method piggyback")
    if args.train_bn and not method.supports_train_bn:
        p.error(f"--train-bn: batch-norm layers already train with --method {method.name}")
    if method.needs_backbone and not args.backbone:
        p.error(f"--method {method.name} needs --weights FILE (an ImageNet weight file of --arch)")
    if not method.needs_backbone and args.backbone:
        p.error("--method scratch starts from random weights; drop --weights")
    if not method.needs_backbone and not args.arch:
        p.error("--method scratch needs --arch")
    if method.name == "feature" and (args.lr is not None or args.optimizer or args.weight_decay is not None):
        p.error("--method feature trains only the classifier: use --head-lr/--head-optimizer")
    given = [f"--{k.replace('_', '-')}" for k in _MASK_FLAGS if getattr(args, k) is not None]
    if not method.uses_masks and given:
        p.error(f"{', '.join(given)} only apply to --method piggyback")
    if args.size < 8:
        p.error(f"--size must be >= 8, got {args.size}")
    if args.eval_resize is not None and args.eval_resize < args.size:
        p.error(f"--eval-resize {args.eval_resize} must be >= --size {args.size}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        p.error(f"--crop-scale {args.crop_scale[0]} {args.crop_scale[1]}: need 0 < LO <= HI <= 1")
    for key in ("train_limit", "eval_limit"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.print_freq < 1:
        p.error("--print-freq must be >= 1")
    resolve_training_args(args, method.uses_masks, {"optimizer": method.optimizer, "lr": method.lr,
                                                    "weight_decay": method.weight_decay}, p.error)
    args.crop_scale = list(args.crop_scale)
    args.eval_resize = args.eval_resize or int(round(args.size * 256 / 224))
    return args




def resolve_arch(arch: Optional[str], weights: Optional[Path]) -> str:
    """``arch``, or the architecture recorded in a safetensors weight file."""
    if arch:
        return arch
    if weights is not None and weights.suffix == ".safetensors":
        recorded = read_safetensors_metadata(weights).get("arch")
        if recorded:
            return recorded
    raise UsageError(f"--arch is needed: {weights} does not record its architecture")


def make_transforms(cfg) -> Dict[str, ClassificationTransform]:
    common = dict(size=cfg["size"], eval_resize=cfg["eval_resize"])
    return {"train": ClassificationTransform(train=True, crop_scale=tuple(cfg["crop_scale"]),
                                             hflip=cfg["hflip"] == "on", **common),
            "eval": ClassificationTransform(train=False, **common)}


def _loaders(args, dist: DistInfo, prec: Precision):
    tf = make_transforms(vars(args))
    train_set = ImageFolderDataset(args.data_root, "train", tf["train"], seed=args.seed, limit=args.train_limit)
    eval_set = ImageFolderDataset(args.data_root, args.eval_split, tf["eval"], limit=args.eval_limit,
                                  classes=train_set.classes)
    common = dict(batch_size=args.batch_size, workers=args.workers, dist_info=dist, seed=args.seed,
                  pin_memory=prec.device.type == "cuda")
    return build_loader(train_set, train=True, **common), build_loader(eval_set, train=False, **common)


def train(args: argparse.Namespace, dist: DistInfo, log=print) -> Dict[str, Any]:
    """Train (or resume) one run into ``args.out`` and return its metrics."""
    run = RunDir(args.out, dist.is_main)
    method = get_method(args.method)
    weights = resolve_weights(args.backbone) if args.backbone else None
    arch = resolve_arch(args.arch, weights)
    seed_everything(args.seed, dist.rank)
    prec = Precision(dist.device, resolve_switch(args.amp, False),
                     resolve_switch(args.channels_last, default_channels_last(dist.device)))
    train_loader, eval_loader = _loaders(args, dist, prec)
    classes = train_loader.dataset.classes
    model, report = create_model(arch, len(classes), weights)
    head = report["classifier"]
    prepared = method.prepare(model, head=(head,), ternary=args.ternary, train_bn=args.train_bn,
                              mask_options={k: getattr(args, k) for k in _MASK_FLAGS} if method.uses_masks else None)
    model = maybe_channels_last(model.to(prec.device), prec.channels_last)
    optimizers = build_optimizers(prepared, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                                  head_optimizer=args.head_optimizer, head_lr=args.head_lr,
                                  head_weight_decay=args.head_weight_decay)
    schedulers = {name: torch.optim.lr_scheduler.MultiStepLR(o, milestones=sorted(args.lr_steps), gamma=args.lr_gamma)
                  for name, o in optimizers.items()}
    compile_used = resolve_switch(args.compile, dist.device.type == "cuda")
    train_model, eval_model = compile_model(model, dist, compile_used)
    config = dict(vars(args), arch=arch, eval_split=eval_loader.dataset.split, classes=classes,
                  num_classes=len(classes), classifier=head, world_size=dist.world_size,
                  backbone=str(weights.resolve()) if weights else None,
                  backbone_sha256=file_sha256(weights) if weights else None,
                  weights_layout=report.get("layout"), amp_used=prec.amp,
                  channels_last_used=prec.channels_last, compile_used=compile_used,
                  data_root=os.path.abspath(args.data_root), out=os.path.abspath(args.out),
                  train_images=len(train_loader.dataset), eval_images=len(eval_loader.dataset))
    if not method.uses_masks:
        config["recipe"] = None  # the recipe only concerns masks
    log(f"{method.name} on {arch} ({weights or 'random weights'}), {len(classes)} classes, "
        f"{config['train_images']} train / {config['eval_images']} {config['eval_split']} images at "
        f"{args.size} px, {sum(p.numel() for p in prepared.main + prepared.head)} trainable values, "
        f"device {prec.device}")
    state = FitState(model, optimizers, schedulers, train_model, eval_model, prepared.frozen_modules)
    t0 = time.time()
    result = fit(run, state, ClassificationPipeline(prec, eval_loader, len(classes)), train_loader,
                 epochs=args.epochs, config=config, dist=dist, set_epoch=partial(set_loader_epoch, train_loader),
                 print_freq=args.print_freq, log=log, may_change=MAY_CHANGE_ON_RESUME)
    last = result.record
    meta = dict(task=Path(config["data_root"]).name, arch=arch, method=method.name, num_classes=len(classes),
                classes=classes, backbone=config["backbone"], backbone_sha256=config["backbone_sha256"],
                size=args.size, eval_resize=args.eval_resize, recipe=config["recipe"], top1=last["val_top1"])
    metrics = dict(meta, split=config["eval_split"], eval_count=last["val_count"], train_top1=last["train_top1"],
                   train_loss=last["train_loss"], epochs=len(result.history), step_time_s=last["step_time_s"],
                   time_s=time.time() - t0, collapse=result.collapse, train_bn=args.train_bn,
                   train_images=config["train_images"], steps_per_epoch=len(train_loader))
    if method.uses_masks:
        sp = sparsity(model)
        metrics.update(sparsity=sp["total"], sparsity_layers=sp["layers"], masked_weights=sp["numel"],
                       result_file="masks.safetensors")
    else:
        metrics.update(sparsity=None, result_file="weights.safetensors")
    if dist.is_main:
        if method.uses_masks:
            save_masks(model, run.file("masks.safetensors"), **{k: v for k, v in meta.items() if k not in RESERVED_KEYS})
        else:
            save_weights_file(run.file("weights.safetensors"), model, format=WEIGHTS_FORMAT, **meta)
        run.write_json("metrics.json", metrics)
        save_run_plots(run.path)
    barrier()
    log(f"done: {config['eval_split']} top-1 {metrics['top1']:.2f}%"
        + (f", mask sparsity {metrics['sparsity']:.4f}" if metrics["sparsity"] is not None else "")
        + (f"; COLLAPSE at step {result.collapse['step']}" if result.collapse else "")
        + f"; results in {run.path}")
    return metrics


def main(args: argparse.Namespace) -> Dict[str, Any]:
    dist = init_distributed(args.device)
    try:
        return train(args, dist, log=partial(print, flush=True) if dist.is_main else (lambda *_: None))
    finally:
        cleanup()


def cli(argv=None) -> int:
    return run_cli(get_args_parser(), main, argv, check_args)


if __name__ == "__main__":
    sys.exit(cli())
