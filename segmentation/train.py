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
import datetime
import sys
import time
from pathlib import Path
from typing import Dict

import torch
from torch.utils.data import DataLoader

from common.accounting import sparsity
from common.amp import default_amp
from common.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from common.cli import add_common_args, run_cli
from common.distributed import barrier, cleanup, init_distributed, make_sampler, wrap_ddp
from common.masking import MASK_INITS, backbone_fingerprint, is_piggybacked, mask_parameters, task_parameters
from common.runlog import RunDir
from common.seed import epoch_generator, reseed_loader, seed_everything, worker_init_fn

from .data import NUM_CLASSES, SPLITS, build_split, class_names, pad_collate
from .engine import evaluate, summarize, train_one_epoch
from .model import ARCHS, NEW_LAYERS
from .report import format_metrics, format_storage, storage_report
from .runs import METHODS, build_model, load_trainable_state, save_task_weights, trainable_state
from .weights import resolve_backbone

__all__ = ["get_args_parser", "check_args", "main", "cli", "build_optimizers", "make_loaders",
           "OPTIMIZERS", "METHOD_DEFAULTS", "RunError"]

DATA_ROOT_ENV = "PASCAL_ROOT"
DEFAULT_DATA_ROOT = "data/pascal"
_SWITCH = ("auto", "on", "off")
# Per method: optimizer / learning rate / weight decay of the masks (piggyback) or of the
# backbone weights (finetune). Adam at 1e-4 is the paper's mask setting; the finetuning
# SGD follows the FCN reference (momentum 0.99, weight decay 5e-4) with its lr of 1e-10
# on a loss summed over ~2e5 pixels per image turned into 2e-5 for a mean-reduced loss.
METHOD_DEFAULTS = {
    "piggyback": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0},
    "finetune": {"optimizer": "sgd", "lr": 2e-5, "weight_decay": 5e-4},
}
OPTIMIZERS = {
    "sgd": lambda params, lr, wd, momentum: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd),
    "adam": lambda params, lr, wd, momentum: torch.optim.Adam(params, lr=lr, weight_decay=wd),
}
# Settings that change the result: a resumed run must have the same ones.
RESUME_SETTINGS = ("arch", "method", "split", "val_list", "learn_upsample", "backbone_kind", "input_convention",
                   "seed", "batch_size", "world_size", "optimizer", "lr", "weight_decay", "head_optimizer",
                   "head_lr", "head_weight_decay", "momentum", "threshold", "mask_init", "mask_scale", "amp_used")
MASK_FLAGS = {"threshold": 5e-3, "mask_init": "constant", "mask_scale": 1e-2}


class RunError(ValueError):
    """A run folder that cannot be resumed as asked."""


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
    m = p.add_argument_group("masks (piggyback)")
    m.add_argument("--threshold", type=float, default=None, help="binarizer threshold tau of eq. 4 (default: 5e-3)")
    m.add_argument("--mask-init", choices=sorted(MASK_INITS), default=None,
                   help="initialisation of the real-valued masks (default: constant)")
    m.add_argument("--mask-scale", type=float, default=None, help="initial real-valued mask value (default: 1e-2)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=None,
                   help="optimizer of the masks / backbone weights (default: piggyback adam, finetune sgd)")
    o.add_argument("--lr", type=float, default=None,
                   help="learning rate of the masks / backbone weights (default: piggyback 1e-4, finetune 2e-5)")
    o.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay of the masks / backbone weights (default: piggyback 0, finetune 5e-4)")
    o.add_argument("--head-optimizer", choices=sorted(OPTIMIZERS), default="sgd",
                   help="optimizer of the new layers (default: sgd)")
    o.add_argument("--head-lr", type=float, default=2e-5, help="learning rate of the new layers (default: 2e-5)")
    o.add_argument("--head-weight-decay", type=float, default=5e-4,
                   help="weight decay of the new layers (default: 5e-4)")
    o.add_argument("--momentum", type=float, default=None, help="momentum of every SGD optimizer (default: 0.99)")
    r = p.add_argument_group("runtime")
    r.add_argument("--amp", choices=_SWITCH, default="auto",
                   help="bf16 autocast; auto = on for CUDA devices with bf16 (default: auto)")
    r.add_argument("--print-freq", type=int, default=20, help="steps between progress lines (default: 20)")
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
    for key, default in MASK_FLAGS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    for key, default in METHOD_DEFAULTS[args.method].items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.momentum is not None and "sgd" not in (args.optimizer, args.head_optimizer):
        p.error("--momentum only applies to SGD; neither --optimizer nor --head-optimizer is sgd")
    args.momentum = 0.99 if args.momentum is None else args.momentum
    for key in ("lr", "head_lr", "threshold", "mask_scale"):
        if not getattr(args, key) > 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}")
    for key in ("weight_decay", "head_weight_decay", "momentum"):
        if getattr(args, key) < 0:
            p.error(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if args.print_freq < 1:
        p.error(f"--print-freq must be >= 1, got {args.print_freq}")
    return args


def build_optimizers(model: torch.nn.Module, args) -> Dict[str, torch.optim.Optimizer]:
    """Mixed training: one optimizer for the masks (or backbone weights), one for the new layers."""
    head = task_parameters(model) if is_piggybacked(model) else [
        p for name, p in model.named_parameters() if p.requires_grad and name.split(".")[0] in NEW_LAYERS]
    head_ids = {id(p) for p in head}
    main = mask_parameters(model) if is_piggybacked(model) else [
        p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    return {"main": OPTIMIZERS[args.optimizer](main, args.lr, args.weight_decay, args.momentum),
            "head": OPTIMIZERS[args.head_optimizer](head, args.head_lr, args.head_weight_decay, args.momentum)}


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


def _resume(run: RunDir, settings: dict, model, optimizers, fingerprint) -> int:
    """Load checkpoint.pt (if any) into model and optimizers; returns the epoch to start at."""
    path = run.file("checkpoint.pt")
    if not path.exists():
        return 0
    ckpt = load_checkpoint(path)
    changed = {k: (ckpt["settings"].get(k), settings.get(k)) for k in RESUME_SETTINGS
               if ckpt["settings"].get(k) != settings.get(k)}
    if changed:
        raise RunError(f"{path} was written with other settings {changed} (checkpoint, now); "
                       f"use another --out or the same flags")
    if ckpt["fingerprint"] != fingerprint:
        raise RunError(f"{path} was trained on another backbone than {settings['backbone_path']}")
    load_trainable_state(model, ckpt["model"], str(path))
    for name, opt in optimizers.items():
        opt.load_state_dict(ckpt["optimizers"][name])
    set_rng_state(ckpt["rng"])
    if run.is_main:
        print(f"resuming {run.path} after epoch {ckpt['epoch']}")
    return int(ckpt["epoch"])


def main(args: argparse.Namespace) -> dict:
    dist_info = init_distributed(args.device)
    try:
        return _train(args, dist_info)
    finally:
        cleanup()


def _train(args: argparse.Namespace, dist_info) -> dict:
    device = dist_info.device
    source = resolve_backbone(args.arch, args.backbone, args.caffe_weights, args.random_init)
    amp = default_amp(device) if args.amp == "auto" else args.amp == "on"
    config = dict(vars(args))
    # Absolute paths, so that segmentation.evaluate finds everything from any folder.
    for key in ("data_root", "out", "val_list", "backbone", "caffe_weights"):
        if config[key]:
            config[key] = str(Path(config[key]).resolve())
    config.update(backbone_kind=source.kind, backbone_path=str(source.path.resolve()) if source.path else None,
                  input_convention=source.convention, num_classes=NUM_CLASSES, amp_used=amp,
                  world_size=dist_info.world_size)

    # Data first: a missing or malformed file should fail before VGG-16 is built.
    train_loader, val_loader = make_loaders(args, source.convention, dist_info)
    run = RunDir(args.out, dist_info.is_main)
    model = build_model(args.arch, args.method, source, seed=args.seed, learn_upsample=args.learn_upsample,
                        mask_options={k: getattr(args, k) for k in MASK_FLAGS}).to(device)
    optimizers = build_optimizers(model, args)
    fingerprint = backbone_fingerprint(model) if is_piggybacked(model) else None
    seed_everything(args.seed, dist_info.rank)
    start = _resume(run, config, model, optimizers, fingerprint)
    run.write_config(config)
    run.trim_log(start + 1)
    ddp_model = wrap_ddp(model, dist_info)
    if dist_info.is_main:
        print(f"{args.method} FCN-32s on {args.arch} from {source.describe()}; --split {args.split}: "
              f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} eval images; "
              f"{dist_info.world_size} process(es) on {device}")

    metrics, t_run = None, time.perf_counter()
    for epoch in range(start, args.epochs):
        reseed_loader(train_loader, args.seed, epoch, dist_info.rank)
        t0 = time.perf_counter()
        header = f"epoch {epoch + 1}/{args.epochs}"
        stats = train_one_epoch(ddp_model, train_loader, optimizers, device, epoch + 1, amp=amp,
                                print_freq=args.print_freq, is_main=dist_info.is_main, header=header)
        metrics = evaluate(model, val_loader, device, NUM_CLASSES, amp=amp, print_freq=10 * args.print_freq,
                           is_main=dist_info.is_main, header=f"eval {epoch + 1}/{args.epochs}")
        record = {"epoch": epoch + 1, "train_loss": stats["loss"],
                  **{k: metrics[k] for k in ("pixel_acc", "mean_acc", "mean_iou", "fw_iou")},
                  "lr": {k: o.param_groups[0]["lr"] for k, o in optimizers.items()},
                  "epoch_time_s": time.perf_counter() - t0}
        if is_piggybacked(model):
            record["sparsity"] = sparsity(model)["total"]
        run.log_epoch(record)
        if dist_info.is_main:
            save_checkpoint(run.file("checkpoint.pt"), {
                "model": trainable_state(model), "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "epoch": epoch + 1, "rng": rng_state(), "settings": config, "fingerprint": fingerprint})
            per_epoch = (time.perf_counter() - t_run) / (epoch + 1 - start)
            eta = datetime.timedelta(seconds=int(per_epoch * (args.epochs - epoch - 1)))
            print(f"{header}: train loss {stats['loss']:.4f}  mean IoU {100 * metrics['mean_iou']:.2f}  "
                  f"pixel acc {100 * metrics['pixel_acc']:.2f}  ({record['epoch_time_s']:.1f}s, ETA {eta})")
        barrier()
    if metrics is None:  # the checkpoint already holds the last epoch
        metrics = evaluate(model, val_loader, device, NUM_CLASSES, amp=amp, is_main=dist_info.is_main)
    return _finish(run, model, config, metrics, val_loader.dataset)


def _finish(run: RunDir, model, config: dict, metrics: dict, val_set) -> dict:
    """Write the task's weights and metrics.json (main process); returns the metrics."""
    names = class_names()
    storage = storage_report(model)
    result = {"split": config["split"], "method": config["method"], "arch": config["arch"],
              "backbone": config["backbone_kind"], "epochs": config["epochs"], "eval_images": len(val_set),
              **summarize(metrics, names), "storage": storage}
    if getattr(val_set, "listed", None) is not None:
        result["eval_listed"] = val_set.listed
    if is_piggybacked(model):
        result["sparsity"] = sparsity(model)["total"]
    if run.is_main:
        meta = {k: config[k] for k in ("arch", "method", "split", "learn_upsample", "input_convention",
                                       "backbone_kind", "num_classes", "seed")}
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
