"""What the paper's section 4 setting supplies to the training runner (:mod:`common.runner`):
an ImageFolder tree checked before the first step, any torchvision or timm network filled
from a local ImageNet weight file with a new classifier (optionally started from the
piggyback authors' training checkpoint), the classification loss and top-1 evaluation,
and what the artifact and ``metrics.json`` record.

What ``auto`` means here: torch.compile's default mode and channels_last on CUDA, off on
the CPU; fp32 (TF32 matrix units on a GPU).
"""
from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Dict, Optional

from common.classify import ClassificationPipeline, evaluate_classifier
from common.errors import DataError, UsageError
from common.loaders import build_loader, set_loader_epoch
from common.atomic import file_sha256, user_cache_dir
from common.runner import Data, TrainingTask
from common.runtime import AutoPolicy
from classification.data import (ClassificationTransform, ImageFolderDataset, check_splits, resolve_split,
                                 scan_images, unread_text)
from classification.models import arch_source, pretrained_model
from classification.weights import check_weights_file, resolve_weights

__all__ = ["ClassificationTask", "make_transforms", "resolve_arch", "checked_datasets"]


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


def epoch_split(cfg) -> str:
    """The split scored after every epoch: ``--eval-split``, or (auto) ``val`` where the data
    root has one, else ``test``."""
    return resolve_split(cfg.data_root, cfg.eval_split, order=("val", "test"))


def _datasets(cfg, tf, exclude=None):
    train_set = ImageFolderDataset(cfg.data_root, "train", tf["train"], seed=cfg.seed, limit=cfg.train_limit,
                                   exclude=exclude)
    eval_set = ImageFolderDataset(cfg.data_root, epoch_split(cfg), tf["eval"], limit=cfg.eval_limit,
                                  classes=train_set.classes, exclude=exclude)
    test_set = None
    if eval_set.split == "val" and cfg.eval_split == "auto" and (Path(cfg.data_root) / "test").is_dir():
        test_set = ImageFolderDataset(cfg.data_root, "test", tf["eval"], limit=cfg.eval_limit,
                                      classes=train_set.classes, exclude=exclude)
    return train_set, eval_set, test_set


def checked_datasets(cfg, cache=None, log=print):
    """The train and evaluation sets, checked before the first step: classes that differ,
    a single class, empty class folders and limits that leave a class out are refused
    (:func:`classification.data.check_splits`), and every image is decoded once
    (:func:`~classification.data.scan_images`, its results kept in ``cache``). Unreadable
    images are refused, or left out with ``--skip-unreadable``; returns (train set, eval
    set, the test set scored once at the end or None, the files left out)."""
    tf = make_transforms(cfg)
    train_set, eval_set, test_set = _datasets(cfg, tf)
    for dataset in (train_set, eval_set, test_set):
        other: Dict[str, int] = {}
        for counts in getattr(dataset, "unread", []):
            for ext, n in counts.items():
                other[ext] = other.get(ext, 0) + n
        if other:
            log(f"{dataset.root / dataset.split}: leaving out files of types this toolkit does not read: "
                f"{unread_text(other)}")
    check_splits(train_set, eval_set, train_limit=cfg.train_limit, eval_limit=cfg.eval_limit)
    if test_set is not None:
        check_splits(train_set, test_set, train_limit=cfg.train_limit, eval_limit=cfg.eval_limit)
    bad = scan_images(list(train_set.paths) + list(eval_set.paths) + list(test_set.paths if test_set else ()), cache)
    if bad and not cfg.skip_unreadable:
        shown = "; ".join(f"{p}: {why}" for p, why in bad[:3])
        raise DataError(f"{len(bad)} image(s) cannot be read ({shown}{'; ...' if len(bad) > 3 else ''}); fix or "
                        f"remove them, or pass --skip-unreadable to leave them out")
    if bad:
        log(f"leaving out {len(bad)} unreadable image(s), listed in config.json under resolved.unreadable")
        train_set, eval_set, test_set = _datasets(cfg, tf, exclude=[p for p, _ in bad])
        check_splits(train_set, eval_set, train_limit=cfg.train_limit, eval_limit=cfg.eval_limit)
    return train_set, eval_set, test_set, bad


class ClassificationTask(TrainingTask):
    policy = AutoPolicy(compile_cuda=True, compile_distributed=True, channels_last="cuda")

    def __init__(self, cfg, dist, log=print):
        super().__init__(cfg, dist, log)
        arch_name = arch_source(cfg.arch)[1] if cfg.arch else None
        self.weights = resolve_weights(cfg.backbone, arch_name) if cfg.backbone else None
        if self.weights is not None:
            check_weights_file(self.weights)
        self.arch = resolve_arch(cfg.arch, self.weights)

    def build_data(self, runtime) -> Data:
        cfg = self.cfg
        train_set, eval_set, test_set, bad = checked_datasets(cfg, self.scan_cache(), self.log)
        common = dict(batch_size=cfg.batch_size, workers=cfg.loader_workers, dist_info=self.dist, seed=cfg.seed,
                      pin_memory=runtime.device.type == "cuda")
        train = build_loader(train_set, train=True, drop_last=True, **common)
        evaluation = build_loader(eval_set, train=False, **common)
        self.test_loader = build_loader(test_set, train=False, **common) if test_set is not None else None
        return Data(train, evaluation, partial(set_loader_epoch, train),
                    {"eval_split": eval_set.split, "classes": train_set.classes, "num_classes": len(train_set.classes),
                     "train_images": len(train_set), "eval_images": len(eval_set),
                     "test_images": len(test_set) if test_set is not None else None,
                     "unreadable": [p for p, _ in bad]})

    def scan_cache(self) -> Path:
        """Where the decoded-image scan of this data root is kept: the user's cache folder
        (``$PIGGYBACK_CACHE``, else ``$XDG_CACHE_HOME/piggyback`` or ``~/.cache/piggyback``),
        never the run folder, so that a finished run run again writes nothing there."""
        return user_cache_dir() / "image-scan" / f"{hashlib.sha1(str(Path(self.cfg.data_root).resolve()).encode()).hexdigest()[:16]}.json"

    def build_model(self, runtime, data):
        classes = data.facts["classes"]
        model, report = pretrained_model(self.arch, len(classes), self.weights)
        self.head = report["classifier"]
        self.backbone = str(self.weights.resolve()) if self.weights else None
        self.backbone_sha = file_sha256(self.weights) if self.weights else None
        return model, (self.head,), {"arch": self.arch, "classifier": self.head, "backbone": self.backbone,
                                     "backbone_sha256": self.backbone_sha, "weights_layout": report.get("layout")}

    def prepare(self, model, head):
        prepared = super().prepare(model, head)
        if self.cfg.init_masks:
            from classification.published import init_from_checkpoint
            cfg = self.cfg
            start = init_from_checkpoint(model, cfg.init_masks, self.arch, weights=str(self.weights),
                                         train_bn=cfg.train_bn, scheme=cfg.scheme, threshold=cfg.threshold)
            self.log(f"masks and classifier start from {cfg.init_masks} (dataset {start['dataset']!r})")
        return prepared

    def build_pipeline(self, runtime, data, model):
        self.prec = runtime.prec
        return ClassificationPipeline(runtime.prec, data.eval, data.facts["num_classes"], data.facts["eval_split"])

    def final_evaluation(self, eval_model, data):
        """The test split, once, when the epochs were scored on val."""
        if self.test_loader is None:
            return {}
        eval_model.eval()
        out = evaluate_classifier(eval_model, self.test_loader, self.prec, "test")
        self.log(f"test top-1 {out['test_top1']:.2f}% on {out['test_count']} images (scored once, after the last "
                 f"epoch; the epochs were scored on val)")
        return out

    def announce(self, model, prepared, data, runtime, facts) -> str:
        return (f"{self.method.name} on {self.arch} ({self.weights or 'random weights'}), {facts['num_classes']} "
                f"classes, {facts['train_images']} train / {facts['eval_images']} {facts['eval_split']} images at "
                f"{self.cfg.size} px, {prepared.trainable_values()} trainable values, device {runtime.device}")

    def results(self, model, data, result, facts, pipeline):
        cfg, last, split = self.cfg, result.record, facts["eval_split"]
        meta = dict(task=Path(cfg.data_root).name, arch=self.arch, method=self.method.name,
                    num_classes=facts["num_classes"], classes=facts["classes"], backbone=self.backbone,
                    backbone_sha256=self.backbone_sha, size=cfg.size, eval_resize=cfg.eval_resize, recipe=cfg.recipe,
                    scheme=cfg.scheme, top1=last[f"{split}_top1"], top1_split=split)
        if self.method.uses_masks:
            meta.pop("scheme")  # the mask file records its scheme itself
        if "test_top1" in last and split != "test":
            meta.update(test_top1=last["test_top1"])
        metrics = dict(meta, split=split, eval_count=last[f"{split}_count"], train_top1=last["train_top1"],
                       train_loss=last["train_loss"], epochs=len(result.history), step_time_s=last["step_time_s"],
                       collapse=result.collapse, train_bn=cfg.train_bn, train_images=facts["train_images"],
                       steps_per_epoch=len(data.train))
        metrics.update({k: last[k] for k in ("test_top1", "test_loss", "test_count") if k in last})
        done = f"done: {split} top-1 {last[f'{split}_top1']:.2f}%"
        if "test_top1" in last and split != "test":
            done += f", test top-1 {last['test_top1']:.2f}% (scored once)"
        return meta, metrics, done
