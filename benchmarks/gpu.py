"""Benchmark 6 (accelerator): what mask training costs on a GPU, measured the way users run it.

``python -m benchmarks.gpu [--out BENCHMARKS-gpu.md]`` on a machine with a CUDA device.

Part A, the training step (WRN-28-4 at 64x64, Adam, BN frozen, data already on the
device), side by side in one run at batch 32 and 128:

- piggyback with this toolkit's masked layers, eager and under ``torch.compile``;
- finetuning the same network, eager and compiled;
- piggyback with a masked layer written the original code's way (an autograd binarizer
  that makes a new {0, 1} tensor every forward, then ``weight * mask``);
- bf16 autocast + channels_last against fp32;
- CUDA graphs (``torch.compile(mode="reduce-overhead")``) at batch 32, in fp32 NCHW,
  fp32 channels_last and bf16 + channels_last, and with fused Adam;
- the ``affine`` mask scheme against binary masks, eager, compiled and under CUDA graphs
  ("affine ..." and "binary ..."): both prepared and optimised as the training commands
  do (``common.methods``: masks, head and the scheme's values each with their own
  optimiser, the values at their per-layer rates), with the step-time ratio affine /
  binary of each mode and the goal "affine compiled / binary compiled <= 1.05".

Each batch size starts from an empty compile cache, as a training run does.

Part B, end to end (``--end-to-end DIR``, written by ``decathlon.synthetic`` when missing):
``decathlon.train`` itself, one process per run (``--e2e-runs
BATCH:COMPILE:LOADER[:METHOD[:PRECISION]]``): eager, compiled and CUDA graphs; images kept on
the device (``resident``), gathered on the host (``device``) or the worker loader; piggyback
against finetuning; fp32 NCHW against fp32 channels_last (``cl``) and bf16 autocast with
channels_last (``bf16cl``). Images per second and
milliseconds per step are read from each run's own log, with the projected wall time of the
nine-task, 60-epoch recipe and the issue's goals. The report is rewritten after every run,
so a session cut short keeps what it measured. ``--no-steps`` skips part A.

Part C (``--eval``): evaluation of a plain WRN-28-4 eager against compiled and CUDA graphs,
with the compilation's cost and the number of images after which compiling pays back (the
reason the evaluation entry points default to ``--compile auto`` = off).

Part D, the classification and segmentation training commands end to end
(``--training-e2e DIR``): ``classification.train`` (ResNet-50 at 224 px on a synthetic
ImageFolder tree of 256x256 JPEGs) and ``segmentation.train`` (FCN-32s on VGG-16 on a
synthetic SBD tree), with random weight files, one process per run (``--training-runs
PIPELINE:METHOD[:SCHEME]``; default: classification and segmentation with binary masks
and with affine, then classification finetuned). The trees and weight files are written
under DIR when missing. Images per second and milliseconds per step are read from each
run's own log, with the time ratios affine / binary and piggyback / finetune of each
pipeline; the report is rewritten after every run. ``--cls-*`` and ``--seg-*`` set the
networks, sizes, epochs and image counts (the tests run it on the CPU with tiny ones).

``benchmarks.run`` calls :func:`run`, which reports "not measured" without a device.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Tuple

import torch

from benchmarks.gpu_decathlon import E2E_RUNS, end_to_end, parse_run
from benchmarks.gpu_eval import measure_eval
from benchmarks.gpu_steps import CONTENDERS, run
from benchmarks.gpu_training import TRAINING_RUNS, TrainingSetup, \
    parse_training_run, training_end_to_end
from benchmarks.harness import machine_info, markdown_path, render_markdown
from common.errors import UsageError
from common.atomic import atomic_write_bytes
from common.settings import Settings, at_least, option

__all__ = ["GpuConfig", "get_args_parser", "main", "cli"]

_D = TrainingSetup()


@dataclass(frozen=True)
class GpuConfig(Settings):
    PROG: ClassVar[str] = "python -m benchmarks.gpu"
    DESCRIPTION: ClassVar[str] = ("GPU benchmark of mask training (benchmark 6): the WRN-28-4 training step, "
                                  "decathlon.train, classification.train and segmentation.train.")
    EPILOG: ClassVar[str] = ("runs:\n  --e2e-runs RUN: BATCH:COMPILE:LOADER[:METHOD[:PRECISION]]\n"
                             "  --training-runs RUN: PIPELINE:METHOD[:SCHEME] (SCHEME: binary if left out)\n")

    @classmethod
    def epilog(cls) -> str:
        return cls.EPILOG

    out: str = option(str(Path(__file__).resolve().parent.parent / "BENCHMARKS-gpu.md"), "Markdown report to write",
                      type=markdown_path, default_text="BENCHMARKS-gpu.md at the repository root")
    quick: bool = option(False, "fewer rounds", type=bool)
    batches: Tuple[int, ...] = option((32, 128), "batch sizes of part A", type=int, nargs="+")
    only: Optional[Tuple[str, ...]] = option(None, "contenders to time in part A", nargs="+", choices=tuple(CONTENDERS),
                                             metavar="NAME", default_text="all")
    device: str = option("cuda", "cuda; cpu only checks the code path, its figures mean nothing", group="runtime",
                         choices=("cuda", "cpu"))
    steps: bool = option(True, "time the training steps (part A); --no-steps skips them", type=bool)
    eval: bool = option(False, "also time eager against compiled evaluation (part C)",
                        type=bool)
    eval_batch: int = option(256, "batch of part C (decathlon.submit's)", type=int)
    end_to_end: Optional[str] = option(None, "also run decathlon.train on this decathlon tree (part B)",
                                       metavar="DIR")
    task: str = option("svhn", "task of the end-to-end runs")
    e2e_epochs: int = option(5, "epochs of each end-to-end run", type=int)
    e2e_runs: Tuple = option(tuple(parse_run(r) for r in E2E_RUNS), "part B's runs (RUN: below)", type=parse_run, nargs="+", metavar="RUN",
                             default_text="the report's")
    e2e_images: int = option(20000, "synthetic images of --task if --end-to-end is missing", type=int)
    backbone: Optional[str] = option(None, "backbone of the end-to-end runs", metavar="FILE",
                                     default_text="a random WRN-28-4")
    training_e2e: Optional[str] = option(None, "also run classification and segmentation (part D) on "
                                          "synthetic data in DIR", metavar="DIR", default_text="off")
    training_runs: Tuple = option(tuple(parse_training_run(r) for r in TRAINING_RUNS),
                                  "part D's runs (RUN: below)",
                                  type=parse_training_run, nargs="+", metavar="RUN",
                                  default_text="the report's")
    cls_arch: str = option(_D.cls_arch, "network of part D's classification runs", metavar="NAME")
    cls_size: int = option(_D.cls_size, "input size in px of part D's classification runs", type=int, metavar="PX")
    cls_epochs: int = option(_D.cls_epochs, "epochs of each classification run of part D", type=int, metavar="N")
    cls_images: int = option(_D.cls_images, "training images of part D's tree (a tenth as many "
                             "test)", type=int, metavar="N")
    seg_arch: str = option(_D.seg_arch, "VGG backbone of part D's segmentation runs", metavar="NAME")
    seg_epochs: int = option(_D.seg_epochs, "epochs of each segmentation run of part D", type=int, metavar="N")
    seg_images: int = option(_D.seg_images, "SBD images of part D's tree (a tenth, at least 2, "
                             "to evaluate)", type=int, metavar="N")
    seg_sides: Tuple[int, int] = option(_D.seg_sides, "image sides in px of part D's segmentation tree", type=int, nargs=2, metavar=("LO", "HI"))

    def check(self) -> None:
        super().check()
        for name in ("eval_batch", "cls_size", "cls_epochs", "cls_images", "seg_epochs", "seg_images"):
            at_least(name, getattr(self, name), 1)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine "
                             "with a GPU, or pass --device cpu to check the code path")
        if self.backbone is not None and not Path(self.backbone).is_file():
            raise UsageError(f"--backbone {self.backbone}: no such file (expected a backbone file from python -m "
                             f"decathlon.pretrain; leave it out for a random WRN-28-4)")
        if self.seg_sides[0] > self.seg_sides[1]:
            raise UsageError(f"--seg-sides {self.seg_sides[0]} {self.seg_sides[1]}: LO must not exceed HI")
        if self.training_e2e is not None and Path(self.training_e2e).exists() and not Path(self.training_e2e).is_dir():
            raise UsageError(f"--training-e2e {self.training_e2e}: exists and is not a folder")


def get_args_parser():
    return GpuConfig.parser()


def main(args: GpuConfig) -> int:
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    info = machine_info()
    if args.device == "cuda":
        info["GPU"] = torch.cuda.get_device_name()
        info["CUDA"] = str(torch.version.cuda)
        info["cuDNN"] = str(torch.backends.cudnn.version())

    def write(sections):
        atomic_write_bytes(args.out, render_markdown(sections, info, title="GPU benchmark").encode("utf-8"))

    sections = [] if not args.steps else [run(args.quick, {}, device=args.device, batches=args.batches, names=args.only)]
    if args.eval:
        sections.append(measure_eval(torch.device(args.device), args.eval_batch, log=log))
    if sections:
        write(sections)
    if args.end_to_end:
        root = Path(args.end_to_end)
        if not root.exists():
            from decathlon.synthetic import make_synthetic_decathlon
            from decathlon.tasks import get_task
            classes = min(10, get_task(args.task).num_classes)
            t0 = time.perf_counter()
            make_synthetic_decathlon(root, tasks=(args.task,), num_classes={args.task: classes},
                                     train_per_class=max(1, args.e2e_images // classes),
                                     val_per_class=max(1, args.e2e_images // classes // 10), test_per_class=1)
            log(f"wrote a synthetic {args.task} tree at {root} in {time.perf_counter() - t0:.0f}s")
        out = Path(os.environ.get("TMPDIR", "/tmp")) / "piggyback-e2e"
        backbone = args.backbone
        if backbone is None:
            from decathlon.models import save_backbone
            from decathlon.networks import create_model
            backbone = out / "backbone-wrn28_4-random.safetensors"
            torch.manual_seed(0)
            save_backbone(backbone, create_model("wrn28_4", 1000), "wrn28_4", note="random weights (benchmark)")
        extra = ["--cache-dir", str(out / "cache"), "--backbone", str(backbone)]
        if args.device == "cpu":
            extra += ["--device", "cpu"]
        sections.append(end_to_end(root, args.task, out, args.e2e_runs, args.e2e_epochs, extra, log=log,
                                   report=lambda s: write([*sections, s])))
    if args.training_e2e:
        setup = TrainingSetup(args.cls_arch, args.cls_size, args.cls_epochs, args.cls_images, args.seg_arch,
                              args.seg_epochs, args.seg_images, tuple(args.seg_sides))
        extra = ["--device", "cpu", "--workers", "0"] if args.device == "cpu" else []
        out = Path(os.environ.get("TMPDIR", "/tmp")) / "piggyback-training-e2e"
        sections.append(training_end_to_end(Path(args.training_e2e), out, args.training_runs, setup, extra, log=log,
                                            report=lambda s: write([*sections, s])))
    write(sections)
    print(f"[benchmarks.gpu] wrote {args.out}")
    return 0


def cli(argv=None) -> int:
    return GpuConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
