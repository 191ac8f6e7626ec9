"""``python -m classification.train``: the paper's section 4 setting. A new classification
task on an ImageNet-trained torchvision or timm network, by piggyback masks or one of
the paper's baselines, over an ImageFolder tree.

The run folder ``--out`` receives ``config.json``, ``log.jsonl`` (one line per epoch),
``checkpoint.pt`` (after every epoch; the same command resumes from it), the method's
artifact (``masks.safetensors`` for piggyback: packed masks, new classifier, task BN;
``weights.safetensors`` for the baselines), ``metrics.json`` (top-1 on the evaluation
split, mask sparsity in total and per layer, collapse if any) and the pictures
``curves.png`` and ``sparsity.png`` (weights masked out per layer, the paper's Fig. 3).
The weight file is only read. Multi-GPU: ``torchrun --nproc_per_node N -m classification.train ...``.
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

from common.amp import Precision, default_channels_last, maybe_channels_last, resolve_switch
from common.classify import ClassificationPipeline
from common.cli import run_config_cli
from common.config import build_parser
from common.distributed import DistInfo, cleanup, init_distributed
from common.engine import FitState, compile_model, fit
from common.errors import UsageError
from common.methods import build_optimizers, get_method, make_schedulers
from common.runlog import RunDir, file_sha256
from common.runs import finish_task, start_run
from common.seed import seed_everything
from classification.config import ClassificationConfig
from classification.data import ClassificationTransform, ImageFolderDataset, build_loader, set_loader_epoch
from classification.models import create_model
from classification.weights import check_weights_file, resolve_weights

__all__ = ["get_args_parser", "parse_config", "main", "cli", "train", "make_transforms", "resolve_arch"]


def get_args_parser():
    return build_parser(ClassificationConfig, "Learn a new classification task on a frozen ImageNet network with "
                                              "a piggyback mask (or a baseline of the paper's Table 2) over an "
                                              "ImageFolder tree DIR/train/<class>/*, DIR/test/<class>/* (or val/).")


def parse_config(argv=None) -> ClassificationConfig:
    return ClassificationConfig.from_cli(get_args_parser(), argv)


def resolve_arch(arch: Optional[str], weights: Optional[Path]) -> str:
    """``arch``, or the architecture recorded in a safetensors weight file."""
    if arch:
        return arch
    if weights is not None and weights.suffix == ".safetensors":
        from common.weightsfile import safetensors_metadata
        recorded = safetensors_metadata(weights, "weights").get("arch")
        if recorded:
            return recorded
    raise UsageError(f"--arch is needed: {weights} does not record its architecture")


def make_transforms(cfg) -> Dict[str, ClassificationTransform]:
    """The training and evaluation transforms of a configuration (or of a run's
    config.json read as a mapping)."""
    get = cfg.get if isinstance(cfg, dict) else partial(getattr, cfg)
    common = dict(size=get("size"), eval_resize=get("eval_resize"))
    return {"train": ClassificationTransform(train=True, crop_scale=tuple(get("crop_scale")),
                                             hflip=get("hflip") == "on", **common),
            "eval": ClassificationTransform(train=False, **common)}


SCAN_CACHE = ".image-scan.json"


def _datasets(cfg: ClassificationConfig, tf, exclude=None):
    train_set = ImageFolderDataset(cfg.data_root, "train", tf["train"], seed=cfg.seed, limit=cfg.train_limit,
                                   exclude=exclude)
    eval_set = ImageFolderDataset(cfg.data_root, cfg.eval_split, tf["eval"], limit=cfg.eval_limit,
                                  classes=train_set.classes, exclude=exclude)
    return train_set, eval_set


def checked_datasets(cfg: ClassificationConfig, run: RunDir, log=print):
    """The train and evaluation sets, checked before the first step: classes that differ,
    a single class, empty class folders and limits that leave a class out are refused
    (:func:`classification.data.check_splits`), and every image is decoded once
    (:func:`~classification.data.scan_images`, cached in the run folder on a resume).
    Unreadable images are refused, or left out with ``--skip-unreadable``; returns
    (train set, eval set, the files left out)."""
    from classification.data import check_splits, scan_images
    from common.errors import DataError
    tf = make_transforms(cfg)
    train_set, eval_set = _datasets(cfg, tf)
    check_splits(train_set, eval_set, train_limit=cfg.train_limit, eval_limit=cfg.eval_limit)
    cache = run.file(SCAN_CACHE) if run.file(run.CONFIG).is_file() else None  # a resumed run's folder
    bad = scan_images(list(train_set.paths) + list(eval_set.paths), cache)
    if bad and not cfg.skip_unreadable:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:3])
        raise DataError(f"{len(bad)} image(s) cannot be read ({shown}{'; ...' if len(bad) > 3 else ''}); fix or "
                        f"remove them, or pass --skip-unreadable to leave them out")
    if bad:
        log(f"leaving out {len(bad)} unreadable image(s), listed in config.json under resolved.unreadable")
        train_set, eval_set = _datasets(cfg, tf, exclude=[p for p, _ in bad])
        check_splits(train_set, eval_set, train_limit=cfg.train_limit, eval_limit=cfg.eval_limit)
    return train_set, eval_set, bad


def _loaders(cfg: ClassificationConfig, run: RunDir, dist: DistInfo, prec: Precision, log=print):
    train_set, eval_set, bad = checked_datasets(cfg, run, log)
    common = dict(batch_size=cfg.batch_size, workers=cfg.loader_workers, dist_info=dist, seed=cfg.seed,
                  pin_memory=prec.device.type == "cuda")
    return build_loader(train_set, train=True, **common), build_loader(eval_set, train=False, **common), bad


def train(cfg: ClassificationConfig, dist: DistInfo, log=print) -> Dict[str, Any]:
    """Train (or resume) one run into ``cfg.out`` and return its metrics; the folder's
    lock is held from the first check to the last file written."""
    run = RunDir(cfg.out, dist.is_main)
    run.check_run_folder()
    with run.lock():
        return _train(run, cfg, dist, log)


def _train(run: RunDir, cfg: ClassificationConfig, dist: DistInfo, log) -> Dict[str, Any]:
    method = get_method(cfg.method)
    weights = resolve_weights(cfg.backbone) if cfg.backbone else None
    if weights is not None:
        check_weights_file(weights)
    arch = resolve_arch(cfg.arch, weights)
    seed_everything(cfg.seed, dist.rank)
    prec = Precision(dist.device, resolve_switch(cfg.amp, False),
                     resolve_switch(cfg.channels_last, default_channels_last(dist.device)))
    train_loader, eval_loader, unreadable = _loaders(cfg, run, dist, prec, log)
    classes = train_loader.dataset.classes
    model, report = create_model(arch, len(classes), weights)
    head = report["classifier"]
    prepared = method.prepare(model, head=(head,), masks=cfg.mask_settings(), train_bn=cfg.train_bn)
    model = maybe_channels_last(model.to(prec.device), prec.channels_last)
    optimizers = build_optimizers(prepared, cfg)
    schedulers = make_schedulers(optimizers, cfg)
    compile_used = resolve_switch(cfg.compile, dist.device.type == "cuda")
    train_model, eval_model = compile_model(model, dist, compile_used)
    backbone = str(weights.resolve()) if weights else None
    backbone_sha = file_sha256(weights) if weights else None
    record = start_run(cfg, dist, arch=arch, eval_split=eval_loader.dataset.split, classes=classes,
                       num_classes=len(classes), classifier=head, backbone=backbone, backbone_sha256=backbone_sha,
                       weights_layout=report.get("layout"), amp=prec.amp, channels_last=prec.channels_last,
                       compile=compile_used, train_images=len(train_loader.dataset),
                       eval_images=len(eval_loader.dataset), unreadable=[p for p, _ in unreadable])
    log(f"{method.name} on {arch} ({weights or 'random weights'}), {len(classes)} classes, "
        f"{len(train_loader.dataset)} train / {len(eval_loader.dataset)} {eval_loader.dataset.split} images at "
        f"{cfg.size} px, {prepared.trainable_values()} trainable values, device {prec.device}")
    state = FitState(model, optimizers, schedulers, train_model, eval_model, prepared.frozen_modules)
    t0 = time.time()
    result = fit(run, state, ClassificationPipeline(prec, eval_loader, len(classes)), train_loader,
                 epochs=cfg.epochs, config=record, dist=dist, set_epoch=partial(set_loader_epoch, train_loader),
                 print_freq=cfg.print_freq, log=log, may_change=cfg.resume_free())
    last = result.record
    meta = dict(task=Path(cfg.data_root).name, arch=arch, method=method.name, num_classes=len(classes),
                classes=classes, backbone=backbone, backbone_sha256=backbone_sha, size=cfg.size,
                eval_resize=cfg.eval_resize, recipe=cfg.recipe, scheme=cfg.scheme, top1=last["val_top1"])
    if method.uses_masks:
        meta.pop("scheme")  # the mask file records its scheme itself
    metrics = dict(meta, split=eval_loader.dataset.split, eval_count=last["val_count"],
                   train_top1=last["train_top1"], train_loss=last["train_loss"], epochs=len(result.history),
                   step_time_s=last["step_time_s"], collapse=result.collapse, train_bn=cfg.train_bn,
                   train_images=len(train_loader.dataset), steps_per_epoch=len(train_loader))
    return finish_task(run, model, method, meta, metrics, result, started=t0, log=log,
                       summary=f"done: {eval_loader.dataset.split} top-1 {last['val_top1']:.2f}%")


def main(cfg: ClassificationConfig) -> Dict[str, Any]:
    dist = init_distributed(cfg.device, threads=cfg.threads, workers=cfg.workers)
    try:
        return train(cfg, dist, log=partial(print, flush=True) if dist.is_main else (lambda *_: None))
    finally:
        cleanup()


def cli(argv=None) -> int:
    return run_config_cli(lambda: parse_config(argv), main, ClassificationConfig.PROG)


if __name__ == "__main__":
    sys.exit(cli())
