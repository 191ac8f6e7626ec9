"""``python -m segmentation.train``: FCN-32s on a masked VGG-16 for PASCAL VOC.

Mixed training (paper section 6, Fig. 4): with ``--method piggyback`` the VGG backbone is
frozen and masked and its real-valued masks train with Adam (``--optimizer``, ``--lr``),
while the new layers (score_fr, and upscore with ``--learn-upsample``) train from scratch
with their own optimizer and learning rate (``--head-optimizer``, ``--head-lr``).
``--method finetune`` trains every backbone weight with ``--optimizer`` instead.

The run folder (``--out``) receives config.json, log.jsonl (one line per epoch),
checkpoint.pt (rewritten after every epoch; the same command resumes from it), the
method's artifact (masks.safetensors or weights.safetensors) and metrics.json (FCN metrics
on the evaluation set plus a storage report). Multi-GPU:
``torchrun --nproc_per_node N -m segmentation.train ...``.
"""
from __future__ import annotations

import sys
import time
from typing import Dict

from torch.utils.data import DataLoader

from common.amp import maybe_channels_last, resolve_switch
from common.cli import run_config_cli
from common.config import build_parser
from common.distributed import cleanup, init_distributed, make_sampler
from common.engine import FitState, compile_model, fit
from common.methods import build_optimizers, get_method, make_schedulers
from common.runlog import RunDir
from common.runs import finish_task, start_run
from common.seed import epoch_generator, reseed_loader, seed_everything, worker_init_fn

from .config import SegmentationConfig
from .data import NUM_CLASSES, build_split, class_names, pad_collate
from .engine import SegmentationPipeline, summarize
from .report import format_metrics, format_storage, storage_report
from .runs import prepare_model
from .weights import resolve_backbone

__all__ = ["get_args_parser", "parse_config", "main", "cli", "make_loaders"]


def get_args_parser():
    return build_parser(SegmentationConfig, "Train FCN-32s on a masked (or finetuned) VGG-16 for 21-class "
                                            "PASCAL VOC segmentation.")


def parse_config(argv=None) -> SegmentationConfig:
    return SegmentationConfig.from_cli(get_args_parser(), argv)


def make_loaders(cfg: SegmentationConfig, convention: str, dist_info):
    workers = cfg.loader_workers
    train_set = build_split(cfg.split, "train", cfg.data_root, convention, cfg.val_list)
    val_set = build_split(cfg.split, "val", cfg.data_root, convention, cfg.val_list)
    train_loader = DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=make_sampler(train_set, dist_info, True, cfg.seed),
        num_workers=workers, collate_fn=pad_collate, worker_init_fn=worker_init_fn,
        generator=epoch_generator(cfg.seed, 0, dist_info.rank), pin_memory=dist_info.device.type == "cuda")
    # One image per batch: padding to a common size would change the predictions near borders.
    val_loader = DataLoader(val_set, batch_size=1, sampler=make_sampler(val_set, dist_info, False, 0),
                            num_workers=workers, collate_fn=pad_collate)
    return train_loader, val_loader


def _compile_mode(value: str):
    return "reduce-overhead" if value == "cudagraphs" else resolve_switch(value, False)  # see AUTO


def main(cfg: SegmentationConfig) -> dict:
    dist_info = init_distributed(cfg.device, threads=cfg.threads, workers=cfg.workers)
    try:
        run = RunDir(cfg.out, dist_info.is_main)
        run.check_run_folder()
        with run.lock():  # from the first check to the last file written
            return _train(run, cfg, dist_info)
    finally:
        cleanup()


def _train(run: RunDir, cfg: SegmentationConfig, dist_info) -> dict:
    device = dist_info.device
    method = get_method(cfg.method)
    source = resolve_backbone(cfg.arch, cfg.backbone, cfg.caffe_weights, cfg.random_init)
    amp = resolve_switch(cfg.amp, False)
    channels_last = resolve_switch(cfg.channels_last, False)
    use_compile = _compile_mode(cfg.compile)
    # Data first: a missing or malformed file should fail before VGG-16 is built.
    train_loader, val_loader = make_loaders(cfg, source.convention, dist_info)
    model, prepared = prepare_model(cfg.arch, cfg.method, source, seed=cfg.seed, learn_upsample=cfg.learn_upsample,
                                    masks=cfg.mask_settings())
    model = maybe_channels_last(model.to(device), channels_last)
    optimizers = build_optimizers(prepared, cfg)
    seed_everything(cfg.seed, dist_info.rank)
    # Variable image sizes: compiled with dynamic shapes from the start.
    train_model, eval_model = compile_model(model, dist_info, use_compile, dynamic=True)
    record = start_run(cfg, dist_info, backbone_kind=source.kind,
                       backbone_path=str(source.path.resolve()) if source.path else None,
                       input_convention=source.convention, num_classes=NUM_CLASSES, amp=amp,
                       channels_last=channels_last, compile=use_compile)
    pipeline = SegmentationPipeline(device, val_loader, NUM_CLASSES, amp=amp, print_freq=10 * cfg.print_freq,
                                    is_main=dist_info.is_main, header="eval")
    if dist_info.is_main:
        if use_compile:
            print("--compile: inductor compiles FCN training once per distinct input size (H x W); "
                  "expect a compilation at each new size until torch's recompile limit")
        print(f"{cfg.method} FCN-32s on {cfg.arch} from {source.describe()}; --split {cfg.split}: "
              f"{len(train_loader.dataset)} train / {len(val_loader.dataset)} eval images; "
              f"{dist_info.world_size} process(es) on {device}")
    t0 = time.time()
    result = fit(run, FitState(model, optimizers, make_schedulers(optimizers, cfg), train_model=train_model,
                               eval_model=eval_model, frozen_modules=prepared.frozen_modules),
                 pipeline, train_loader, epochs=cfg.epochs, config=record, dist=dist_info,
                 set_epoch=lambda epoch: reseed_loader(train_loader, cfg.seed, epoch, dist_info.rank),
                 print_freq=cfg.print_freq, log=print, may_change=cfg.resume_free())
    metrics = result.evaluation
    if metrics is None:  # the checkpoint already holds the last epoch
        eval_model.eval()
        metrics = pipeline.evaluate(eval_model)
    names = class_names()
    storage = storage_report(model)
    val_set = val_loader.dataset
    summary = {"split": cfg.split, "method": cfg.method, "arch": cfg.arch, "backbone": source.kind,
               "epochs": cfg.epochs, "eval_images": len(val_set), **summarize(metrics, names), "storage": storage,
               "collapse": result.collapse}
    if getattr(val_set, "listed", None) is not None:
        summary["eval_listed"] = val_set.listed
    meta = {"arch": cfg.arch, "method": cfg.method, "split": cfg.split, "learn_upsample": cfg.learn_upsample,
            "input_convention": source.convention, "backbone_kind": source.kind, "num_classes": NUM_CLASSES,
            "seed": cfg.seed, "backbone_path": record["resolved"]["backbone_path"]}
    done = finish_task(run, model, method, meta, summary, result, started=t0, log=print,
                       summary=f"done: mean IoU {100 * summary['mean_iou']:.2f}%")
    if dist_info.is_main:
        print(format_metrics(done, names))
        print(format_storage(done["storage"]))
    return done


def cli(argv=None) -> int:
    return run_config_cli(lambda: parse_config(argv), main, SegmentationConfig.PROG)


if __name__ == "__main__":
    sys.exit(cli())
