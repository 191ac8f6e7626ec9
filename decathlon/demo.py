"""``python -m decathlon.demo --out DIR``: the whole decathlon pipeline on synthetic data.

The first command to run on a fresh machine: it needs no dataset, no weights and no
network. In about a minute on two CPU cores it

1. writes a small synthetic dataset to ``DIR/data``, laid out exactly like
   ``decathlon-1.0`` (all ten tasks, real id prefixes and numbering, real image shapes),
   plus labelled test files in ``DIR/labels``;
2. pretrains a small backbone on its imagenet12 (``DIR/pretrain/backbone.safetensors``);
3. trains the nine piggyback masks (``DIR/runs/<task>/masks.safetensors``);
4. submits with ``decathlon.submit`` to ``DIR/submission/`` (results.json, results.zip,
   summary.json, summary.md, tasks.png) and prints the score table, scored against the
   synthetic labels;
5. draws the pictures: training curves of every run (``curves.png``), mask sparsity per
   layer of every task (``sparsity.png``) and accuracy and points per task against the
   paper (``submission/tasks.png``), all linked from ``submission/summary.md``.

Each step is the real entry point, called in-process with the settings its command line builds,
so the commands printed along the way can be rerun by hand on real data.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, List

import torch

from common.cli import check_device_name
from common.errors import UsageError
from common.plots import save_run_plots
from common.settings import Settings, at_least, option, positive
from decathlon import pretrain, submit, train
from decathlon.config import DecathlonPretrainConfig, DecathlonTrainConfig
from decathlon.networks import model_names
from decathlon.report import TASKS_PNG
from decathlon.synthetic import make_synthetic_decathlon
from decathlon.tasks import MASK_TASKS, SOURCE_TASK

__all__ = ["DemoConfig", "get_args_parser", "main", "cli", "SYNTHETIC_NOTICE"]

SYNTHETIC_NOTICE = ("NOTE: the data is SYNTHETIC (generated images of coloured stripes, a few "
                    "classes per task); these scores show the pipeline works and say nothing "
                    "about accuracy on the real Visual Decathlon.")


@dataclass(frozen=True)
class DemoConfig(Settings):
    PROG: ClassVar[str] = "python -m decathlon.demo"
    DESCRIPTION: ClassVar[str] = ("Generate a synthetic decathlon-1.0 tree, pretrain a small backbone, train nine "
                                  "masks and write a scored submission, all offline.")

    out: str = option("demo", "folder for data/, labels/, pretrain/, runs/ and submission/", metavar="DIR")
    arch: str = option("wrn10_1", "backbone architecture (wrn10_1: a small WRN)", metavar="NAME",
                       choices=model_names)
    classes: int = option(4, "classes with images in each of the nine mask tasks", group="data", type=int)
    source_classes: int = option(10, "classes with images in the synthetic imagenet12", group="data", type=int)
    train_per_class: int = option(16, "training images per class; imagenet12 gets three times as many",
                                  group="data", type=int)
    pretrain_epochs: int = option(10, "epochs of imagenet12 pretraining", group="optimisation", type=int)
    epochs: int = option(10, "epochs per mask task", group="optimisation", type=int)
    mask_lr: float = option(1e-3, "Adam learning rate of the masks (above the paper's 1e-4: the demo takes few steps)", group="optimisation", type=float)
    batch_size: int = option(16, "batch size", group="optimisation", type=int)
    seed: int = option(0, "seed of the synthetic data, pretraining and mask training", type=int)
    device: str = option("auto", "where to run: auto|cpu|cuda|cuda:N", group="runtime", metavar="DEV")
    threads: int = option(1, "CPU threads for torch (one is fastest for the demo's tiny network)",
                          group="runtime", type=int)
    workers: int = option(0, "DataLoader workers (the toy images decode fastest in the main process)",
                          group="runtime", type=int)

    def check(self) -> None:
        super().check()
        for name in ("classes", "source_classes", "train_per_class", "pretrain_epochs", "epochs", "batch_size",
                     "threads"):
            at_least(name, getattr(self, name), 1)
        at_least("workers", self.workers, 0)
        positive("mask_lr", self.mask_lr)
        if self.classes < 2 or self.source_classes < 2:
            raise UsageError("--classes and --source-classes need at least 2 classes to learn anything")
        check_device_name(self.device)


def get_args_parser():
    return DemoConfig.parser()


def _run(module, settings, argv: List[str], log) -> dict:
    """Run an entry point in-process exactly as its command line would."""
    log(f"\n$ python -m {module.__name__} {' '.join(argv)}")
    return module.main(settings.from_cli(argv))


def main(args: DemoConfig, log=print) -> dict:
    out = Path(args.out)
    data, labels = out / "data", out / "labels"
    t0 = time.time()
    log(SYNTHETIC_NOTICE)
    torch.set_num_threads(args.threads)
    log(f"running on {args.device} with {torch.get_num_threads()} CPU thread(s)")
    per_class, held_out = args.train_per_class, max(2, args.train_per_class // 4)
    make_synthetic_decathlon(data, tasks=MASK_TASKS, num_classes=args.classes,
                             train_per_class=per_class, val_per_class=held_out,
                             test_per_class=held_out, seed=args.seed, labels_dir=labels)
    # imagenet12 gets more classes and images than the other tasks, as on the real data.
    make_synthetic_decathlon(data, tasks=[SOURCE_TASK], num_classes=args.source_classes,
                             train_per_class=3 * per_class, val_per_class=held_out,
                             test_per_class=held_out, seed=args.seed, labels_dir=labels)
    log(f"wrote a synthetic decathlon-1.0 tree to {data} and labelled test files to {labels} "
        f"({time.time() - t0:.0f}s)")
    shared = ["--data-root", str(data), "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--seed",
              str(args.seed), "--device", args.device, "--workers", str(args.workers),
              "--print-freq", "1000"]
    _run(pretrain, DecathlonPretrainConfig, ["--arch", args.arch, "--epochs", str(args.pretrain_epochs), "--lr", "0.05",
                    "--out", str(out / "pretrain"), *shared], log)
    backbone = out / "pretrain" / "backbone.safetensors"
    _run(train, DecathlonTrainConfig, ["--task", "all", "--backbone", str(backbone), "--epochs", str(args.epochs),
                 "--lr", str(args.mask_lr), "--head-lr", "1e-2",
                 "--lr-steps", str(max(1, args.epochs * 3 // 4)),
                 "--out", str(out / "runs"), *shared], log)
    summary = _run(submit, submit.SubmitConfig, ["--runs", str(out / "runs"), "--data-root", str(data),
                            "--backbone", str(backbone), "--labels", str(labels),
                            "--out", str(out / "submission"), "--batch-size", "256",
                            "--device", args.device, "--workers", str(args.workers)], log)
    pictures = save_run_plots(out / "pretrain")
    log(f"\npictures: {', '.join(str(p) for p in pictures)}, "
        f"{out / 'runs' / '<task>' / 'curves.png'} and sparsity.png, "
        f"{out / 'submission' / TASKS_PNG} (linked from {out / 'submission' / 'summary.md'})")
    log(f"\ndemo finished in {time.time() - t0:.0f}s: decathlon score {summary['score']:.0f} "
        f"/ 10000 on the synthetic test labels; submission in {out / 'submission'}")
    log(f"parameter ratio {summary['parameter_ratio']:.3f}, of which the masks "
        f"{summary['parameter_ratio_masks_only'] - 1:.3f}: the nine full-size classifiers weigh a "
        f"lot next to a {summary['backbone']['params']:,}-parameter toy backbone (on WRN-28-4 "
        f"nine masks alone give the paper's 1.28)")
    log(SYNTHETIC_NOTICE)
    return summary


def cli(argv=None) -> int:
    return DemoConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
