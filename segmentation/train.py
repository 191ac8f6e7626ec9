"""``python -m segmentation.train``: FCN-32s on a masked VGG-16 for PASCAL VOC.

Mixed training (paper section 6, Fig. 4): with ``--method piggyback`` the VGG backbone is
frozen and masked and its real-valued masks train with Adam (``--optimizer``, ``--lr``),
while the new layers (score_fr, and upscore with ``--learn-upsample``) train from scratch
with their own optimizer and learning rate (``--head-optimizer``, ``--head-lr``).
``--method finetune`` trains every backbone weight with ``--optimizer`` instead.

The run folder (``--out``) receives config.json, log.jsonl (one line per epoch),
checkpoint.pt (rewritten after every epoch; the same command resumes from it), the
task's weights (masks.safetensors or model.safetensors) and metrics.json (FCN metrics
on the evaluation set plus a storage report). Multi-GPU:
``torchrun --nproc_per_node N -m segmentation.train ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict

import torch
from torch.utils.data import DataLoader

from common.accounting import sparsity
from common.amp import SWITCH_CHOICES, TRAIN_AMP_HELP, resolve_switch
from common.cli import add_common_args, run_cli
from common.distributed import cleanup, init_distributed, make_sampler
from common.engine import FitState, compile_model, fit
from common.errors import ResumeError
from common.masking import is_piggybacked
from common.methods import OPTIMIZERS, build_optimizers as _build_optimizers, add_mask_args, resolve_training_args
from common.runlog import RunDir
from common.seed import epoch_generator, reseed_loader, seed_everything, worker_init_fn

from .data import NUM_CLASSES, SPLITS, build_split, class_names, pad_collate
from .engine import SegmentationPipeline, summarize
from .model import ARCHS
from .report import format_metrics, format_storage, storage_report
from .runs import METHODS, prepare_model, save_task_weights
from .weights import resolve_backbone

__all__ = ["get_args_parser", "check_args", "main", "cli", "build_optimizers", "make_loaders",
           "OPTIMIZERS", "METHOD_DEFAULTS", "RunError"]

DATA_ROOT_ENV = "PASCAL_ROOT"
DEFAULT_DATA_ROOT = "data/pascal"
_SWITCH = SWITCH_CHOICES
# Optimizer / learning rate / weight decay of the backbone weights with --method finetune:
# the FCN reference's SGD (momentum 0.99, weight decay 5e-4) with its lr of 1e-10 on a
# loss summed over ~2e5 pixels per image turned into 2e-5 for a mean-reduced loss.
# Piggyback's masks take theirs from the recipe (common.recipes).
METHOD_DEFAULTS = {
    "finetune": {"optimizer": "sgd", "lr": 2e-5, "weight_decay": 5e-4},
}
MASK_FLAGS = ("threshold", "mask_init", "mask_scale", "mask_spread")
# The name resume refusals had before the project's errors were unified.
RunError = ResumeError


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m segmentation.train",
                                description="Train FCN-32s on a masked (or finetuned) VGG-16 for "
                                            "21-class PASCAL VOC segmentation.")
    add_common_args(p, data_root_env=DATA_ROOT_ENV, default_data_root=DEFAULT_DATA_ROOT, default_epochs=15,
                    default_batch_size=1, default_arch="vgg16", default_out="runs/segmentation")
    helps = {"arch": f"backbone architecture: {', '.join(ARCHS)} (default: vgg16)",
             "data_root": f"folder holding benchmark_RELEASE/ (SBD) and VOCdevkit/ (default: ${DATA_ROOT_ENV} "
                          f"if set, else {DEFAULT_DATA_ROOT})",
             "backbone": "torchvision-layout VGG weights file (default: torchvision's vgg16-397923af.pth in "
                         "the torchvision cache); nothing is ever downloaded"}
    for action in p._actions:
        action.help = helps.get(action.dest, action.help)
    p.add_argument("--split", choices=sorted(SPLITS), default="sbd",
                   help="sbd: train on SBD train, evaluate on VOC2011 seg11valid; voc: VOC train / val "
                        "(default: sbd)")
    p.add_argument("--val-list", default=None, metavar="FILE",
                   help="ids to evaluate instead of the shipped seg11valid list (--split sbd only)")
    p.add_argument("--method", choices=sorted(METHODS), default="piggyback",
                   help="piggyback: learn masks on the frozen backbone; finetune: train every weight "
                        "(default: piggyback)")
    p.add_argument("--learn-upsample", action="store_true",
                   help="train the bilinear-initialised stride-32 upsampling (default: fixed)")
    w = p.add_argument_group("backbone weights")
    w.add_argument("--caffe-weights", default=None, metavar="PATH",
                   help="Caffe-converted VGG-16 weights; the input becomes BGR in 0-255 minus the Caffe mean")
    w.add_argument("--random-init", action="store_true",
                   help="random backbone instead of pretrained weights (for tests and demos)")
    add_mask_args(p)
    o = p.add_argument_group("optimisation")
    o.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None,
                   help="optimizer of the masks / backbone weights (default: piggyback from --recipe, "
                        "finetune sgd)")
    o.add_argument("--lr", type=float, default=None,
                   help="learning rate of the masks / backbone weights (default: piggyback from --recipe, "
                        "finetune 2e-5)")
    o.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay of the masks / backbone weights (default: piggyback 0, finetune 5e-4)")
    o.add_argument("--head-optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                   help="optimizer of the new layers (default: sgd)")
    o.add_argument("--head-lr", type=float, default=2e-5, help="learning rate of the new layers (default: 2e-5)")
    o.add_argument("--head-weight-decay", type=float, default=5e-4,
                   help="weight decay of the new layers (default: 5e-4)")
    o.add_argument("--momentum", type=float, default=None, help="momentum of every SGD optimizer (default: 0.99)")
    r = p.add_argument_group("runtime")
    r.add_argument("--amp", choices=_SWITCH, default="auto", help=TRAIN_AMP_HELP)
    r.add_argument("--compile", choices=_SWITCH, default="auto",
                   help="torch.compile the FCN for training and evaluation, with dynamic image sizes. "
                        "Images differ in size and inductor specialises FCN training (ceil-mode pooling "
                        "and its backward) to each size, so 'on' compiles a graph per size up to "
                        "torch's recompile limit and then runs eagerly; auto = off (default: auto)")
    r.add_argument("--print-freq", type=int, default=20,
                   help="steps between progress lines, and between the loss checks (non-finite loss, "
                        "collapse) that read the device (default: 20)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Refuse conflicting flags and fill in the per-method defaults."""
    sources = [n for n, v in (("--backbone", args.backbone), ("--caffe-weights", args.caffe_weights),
                              ("--random-init", args.random_init)) if v]
    if len(sources) > 1:
        p.error(f"{' and '.join(sources)} exclude each other: give at most one backbone source")
    if args.arch not in ARCHS:
        p.error(f"--arch {args.arch!r} is unknown; valid: {', '.join(ARCHS)}")
    if args.val_list and args.split != "sbd":
        p.error("--val-list replaces the seg11valid list and only applies to --split sbd")
    given_mask_flags = [f"--{k.replace('_', '-')}" for k in MASK_FLAGS if getattr(args, k) is not None]
    if args.method != "piggyback" and given_mask_flags:
        p.error(f"{', '.join(given_mask_flags)} only apply to --method piggyback")
    resolve_training_args(args, args.method == "piggyback", {"weight_decay": 0.0} if args.method == "piggyback"
                          else METHOD_DEFAULTS[args.method], p.error,
                          non_negative=("weight_decay", "head_weight_decay", "momentum", "mask_spread"))
    if args.momentum is not None and "sgd" not in (args.optimizer, args.head_optimizer):
        p.error("--momentum only applies to SGD; neither --optimizer nor --head-optimizer is sgd")
    args.momentum = 0.99 if args.momentum is None else args.momentum
    for key in ("momentum",):
        if getattr(args, key) < 0:
            p.error(f"--{key} must be >= 0, got {getattr(args, key)}")
    if args.print_freq < 1:
        p.error(f"--print-freq must be >= 1, got {args.print_freq}")
    return args


def build_optimizers(prepared, args) -> Dict[str, torch.optim.Optimizer]:
    """Mixed training: one optimizer for the masks (or backbone weights), one for the new layers."""
    return _build_optimizers(prepared, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                             head_optimizer=args.head_optimizer, head_lr=args.head_lr,
                             head_weight_decay=args.head_weight_decay, momentum=args.momentum)


def make_loaders(args, convention: str, dist_info):
    train_set = build_split(args.split, "train", args.data_root, convention, args.val_list)
    val_set = build_split(args.split, "val", args.data_root, convention, args.val_list)
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, sampler=make_sampler(train_set, dist_info, True, args.seed),
        num_workers=args.workers, collate_fn=pad_collate, worker_init_fn=worker_init_fn,
        generator=epoch_generator(args.seed, 0, dist_info.rank), pin_memory=dist_info.device.type == "cuda")
    # One image per batch: padding to a common size would change the predictions near borders.
    val_loader = DataLoader(val_set, batch_size=1, sampler=make_sampler(val_set, dist_info, False, 0),
                            num_workers=args.workers, collate_fn=pad_collate)
    return train_loader, val_loader


def main(args: argparse.Namespace) -> dict:
    dist_info = init_distributed(args.device)
    try:
        return _train(args, dist_info)
    finally:
        cleanup()


def _train(args: argparse.Namespace, dist_info) -> dict:
    device = dist_info.device
    source = resolve_backbone(args.arch, args.backbone, args.caffe_weights, args.random_init)
    amp = resolve_switch(args.amp, False)
    use_compile = resolve_switch(args.compile, False)  # see --compile's help
    config = dict(vars(args))
    # Absolute paths, so that segmentation.evaluate finds everything from any folder.
    for key in ("data_root", "out", "val_list", "backbone", "caffe_weights"):
        if config[key]:
            config[key] = os.path.abspath(config[key])
    config.update(backbone_kind=source.kind, backbone_path=os.path.abspath(source.path) if source.path else None,
                  input_convention=source.convention, num_classes=NUM_CLASSES, amp_used=amp,
                  compile_used=use_compile, world_size=dist_info.world_size)

    # Data first: a missing or malformed file should fail before VGG-16 is built.
    train_loader, val_loader = make_loaders(args, source.convention, dist_info)
    run = RunDir(args.out, dist_info.is_main)
    model, prepared = prepare_model(args.arch, args.method, source, seed=args.seed,
                                    learn_upsample=args.learn_upsample,
                                    mask_options={k: getattr(args, k) for k in MASK_FLAGS})
    model.to(device)
    optimizers = build_optimizers(prepared, args)
    seed_everything(args.seed, dist_info.rank)
    # Variable image sizes: compiled with dynamic shapes from the start.
    train_model, eval_model = compile_model(model, dist_info, use_compile, dynamic=True)
    pipeline = SegmentationPipeline(device, val_loader, NUM_CLASSES, amp=amp, print_freq=10 * args.print_freq,
                                    is_main=dist_info.is_main, header="eval")
    if dist_info.is_main and use_compile:
        print("--compile on: inductor compiles FCN training once per distinct input size (H x W); "
              "expect a compilation at each new size until torch's recompile limit")
    if dist_info.is_main:
        print(f"{args.method} FCN-32s on {args.arch} from {source.describe()}; --split {args.split}: "
              f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} eval images; "
              f"{dist_info.world_size} process(es) on {device}")
    result = fit(run, FitState(model, optimizers, train_model=train_model, eval_model=eval_model,
                               frozen_modules=prepared.frozen_modules),
                 pipeline, train_loader, epochs=args.epochs, config=config, dist=dist_info,
                 set_epoch=lambda epoch: reseed_loader(train_loader, args.seed, epoch, dist_info.rank),
                 print_freq=args.print_freq, log=print)
    metrics = result.evaluation
    if metrics is None:  # the checkpoint already holds the last epoch
        eval_model.eval()
        metrics = pipeline.evaluate(eval_model)
    return _finish(run, model, config, metrics, val_loader.dataset, result.collapse)


def _finish(run: RunDir, model, config: dict, metrics: dict, val_set, collapse=None) -> dict:
    """Write the task's weights and metrics.json (main process); returns the metrics."""
    names = class_names()
    storage = storage_report(model)
    result = {"split": config["split"], "method": config["method"], "arch": config["arch"],
              "backbone": config["backbone_kind"], "epochs": config["epochs"], "eval_images": len(val_set),
              **summarize(metrics, names), "storage": storage, "collapse": collapse}
    if getattr(val_set, "listed", None) is not None:
        result["eval_listed"] = val_set.listed
    if is_piggybacked(model):
        result["sparsity"] = sparsity(model)["total"]
    if run.is_main:
        meta = {k: config[k] for k in ("arch", "method", "split", "learn_upsample", "input_convention",
                                       "backbone_kind", "num_classes", "seed", "backbone_path")}
        path = save_task_weights(model, run.path, config["method"], meta)
        result.update(weights_file=path.name, weights_file_bytes=path.stat().st_size)
        run.write_json("metrics.json", result)
        print(format_metrics(result, names))
        print(format_storage(storage))
        print(f"results in {run.path}")
    return result


def cli(argv=None) -> int:
    return run_cli(get_args_parser(), main, argv, check_args)


if __name__ == "__main__":
    sys.exit(cli())
