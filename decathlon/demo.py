"""``python -m decathlon.demo --out DIR``: the whole decathlon pipeline on synthetic data.

The first command to run on a fresh machine: it needs no dataset, no weights and no
network. In about a minute on two CPU cores it

1. writes a small synthetic dataset to ``DIR/data``, laid out exactly like
   ``decathlon-1.0`` (all ten tasks, real id prefixes and numbering, real image shapes),
   plus labelled test files in ``DIR/labels``;
2. pretrains a small backbone on its imagenet12 (``DIR/pretrain/backbone.pt``);
3. trains the nine piggyback masks (``DIR/runs/<task>/masks.safetensors``);
4. submits with ``decathlon.submit`` to ``DIR/submission/`` (results.json, results.zip,
   summary.json, summary.md, tasks.png) and prints the score table, scored against the
   synthetic labels;
5. draws the pictures: training curves of every run (``curves.png``), mask sparsity per
   layer of every task (``sparsity.png``) and accuracy and points per task against the
   paper (``submission/tasks.png``), all linked from ``submission/summary.md``.

Each step is the real entry point, called in-process through its ``get_args_parser()``,
so the commands printed along the way can be rerun by hand on real data.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List

import torch

from common.cli import Parser, resolve_device, run_cli
from common.plots import save_run_plots
from decathlon import pretrain, submit, train
from decathlon.synthetic import make_synthetic_decathlon
from decathlon.tasks import MASK_TASKS, SOURCE_TASK

__all__ = ["get_args_parser", "main", "SYNTHETIC_NOTICE"]

SYNTHETIC_NOTICE = ("NOTE: the data is SYNTHETIC (generated images of coloured stripes, a few "
                    "classes per task); these scores show the pipeline works and say nothing "
                    "about accuracy on the real Visual Decathlon.")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m decathlon.demo",
        description="Generate a synthetic decathlon-1.0 tree, pretrain a small backbone, train "
                    "nine masks and write a scored submission, all offline.")
    p.add_argument("--out", default="demo", metavar="DIR",
                   help="folder for data/, labels/, pretrain/, runs/ and submission/ (default: demo)")
    p.add_argument("--arch", default="wrn10_1", metavar="NAME",
                   help="backbone architecture (default: wrn10_1, a small WRN)")
    p.add_argument("--classes", type=int, default=4,
                   help="classes with images in each of the nine mask tasks (default: 4)")
    p.add_argument("--source-classes", type=int, default=10,
                   help="classes with images in the synthetic imagenet12 (default: 10)")
    p.add_argument("--train-per-class", type=int, default=16,
                   help="training images per class; imagenet12 gets three times as many (default: 16)")
    p.add_argument("--pretrain-epochs", type=int, default=10,
                   help="epochs of imagenet12 pretraining (default: 10)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per mask task (default: 10)")
    p.add_argument("--mask-lr", type=float, default=1e-3,
                   help="Adam learning rate of the real-valued masks; higher than the paper's "
                        "1e-4 because the demo takes only a few dozen steps (default: 1e-3)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default: 16)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic data, and the --seed of pretraining and mask "
                        "training (initialisation, data order, augmentation) (default: 0)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N (default: auto)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch; one is fastest for the demo's tiny network and "
                        "robust when other processes share the cores (default: 1)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers; the toy images decode fastest in the main "
                        "process (default: 0)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    for name in ("classes", "source_classes", "train_per_class", "pretrain_epochs", "epochs",
                 "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.classes < 2 or args.source_classes < 2:
        p.error("--classes and --source-classes need at least 2 classes to learn anything")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    if args.mask_lr <= 0:
        p.error(f"--mask-lr must be positive, got {args.mask_lr}")
    try:
        resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:
        p.error(f"--device: {exc}")
    return args


def _run(module, argv: List[str], log) -> dict:
    """Run an entry point in-process exactly as its command line would."""
    log(f"\n$ python -m {module.__name__} {' '.join(argv)}")
    if hasattr(module, "parse_config"):  # training commands: one configuration
        return module.main(module.parse_config(argv))
    parser = module.get_args_parser()
    return module.main(module.check_args(parser, parser.parse_args(argv)))


def main(args: argparse.Namespace, log=print) -> dict:
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
    _run(pretrain, ["--arch", args.arch, "--epochs", str(args.pretrain_epochs), "--lr", "0.05",
                    "--out", str(out / "pretrain"), *shared], log)
    backbone = out / "pretrain" / "backbone.pt"
    _run(train, ["--task", "all", "--backbone", str(backbone), "--epochs", str(args.epochs),
                 "--lr", str(args.mask_lr), "--head-lr", "1e-2",
                 "--lr-steps", str(max(1, args.epochs * 3 // 4)),
                 "--out", str(out / "runs"), *shared], log)
    summary = _run(submit, ["--runs", str(out / "runs"), "--data-root", str(data),
                            "--backbone", str(backbone), "--labels", str(labels),
                            "--out", str(out / "submission"), "--batch-size", "256",
                            "--device", args.device, "--workers", str(args.workers)], log)
    pictures = save_run_plots(out / "pretrain")
    log(f"\npictures: {', '.join(str(p) for p in pictures)}, "
        f"{out / 'runs' / '<task>' / 'curves.png'} and sparsity.png, "
        f"{out / 'submission' / submit.TASKS_PNG} (linked from {out / 'submission' / 'summary.md'})")
    log(f"\ndemo finished in {time.time() - t0:.0f}s: decathlon score {summary['score']:.0f} "
        f"/ 10000 on the synthetic test labels; submission in {out / 'submission'}")
    log(f"parameter ratio {summary['parameter_ratio']:.3f}, of which the masks "
        f"{summary['parameter_ratio_masks_only'] - 1:.3f}: the nine full-size classifiers weigh a "
        f"lot next to a {summary['backbone']['params']:,}-parameter toy backbone (on WRN-28-4 "
        f"nine masks alone give the paper's 1.28)")
    log(SYNTHETIC_NOTICE)
    return summary


def cli(argv=None) -> int:
    return run_cli(get_args_parser(), main, argv, check_args)


if __name__ == "__main__":
    sys.exit(cli())
