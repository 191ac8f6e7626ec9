"""Command-line flags shared by every training entry point, and device resolution.

Each pipeline's ``get_args_parser()`` calls :func:`add_common_args` with its own
defaults, then adds its particular flags, so ``--data-root``, ``--epochs``, ``--seed``
and friends mean the same thing everywhere.
"""
from __future__ import annotations

import argparse
import sys
import os
import re

import torch

from .errors import DeviceError, PiggybackError

__all__ = ["add_common_args", "resolve_device", "default_workers", "run_cli", "USER_ERRORS", "positive_int", "DeviceError",
           "DEVICE_CHOICES_HELP"]

DEVICE_CHOICES_HELP = "auto|cpu|cuda|cuda:N"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def default_workers() -> int:
    """DataLoader workers by default: one per CPU core, at most 8."""
    return min(8, os.cpu_count() or 1)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _device_name(text: str) -> str:
    if not _DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"expected {DEVICE_CHOICES_HELP}, got {text!r}")
    return text


def add_common_args(parser: argparse.ArgumentParser, *, data_root_env: str,
                    default_data_root: str, default_epochs: int, default_batch_size: int,
                    default_arch: str, default_out: str = "runs/latest") -> argparse.ArgumentParser:
    """Add the flags every training script shares to ``parser`` and return it.

    ``--data-root`` defaults to the environment variable ``data_root_env`` when it is set
    (read when this function runs), else to ``default_data_root``.
    """
    env_root = os.environ.get(data_root_env)
    data_root = env_root if env_root else default_data_root
    g = parser.add_argument_group("common options")
    g.add_argument("--data-root", default=data_root, metavar="DIR",
                   help=f"folder holding the dataset (default: ${data_root_env} if set, "
                        f"else {default_data_root}; now {data_root})")
    g.add_argument("--arch", default=default_arch, metavar="NAME",
                   help=f"network architecture to build (default: {default_arch})")
    g.add_argument("--backbone", default=None, metavar="PATH",
                   help="local file with the pretrained backbone weights to piggyback on; "
                        "nothing is ever downloaded (default: none, i.e. the pipeline's "
                        "own lookup, which fails with instructions when weights are missing)")
    g.add_argument("--epochs", type=positive_int, default=default_epochs,
                   help=f"number of training epochs (default: {default_epochs})")
    g.add_argument("--batch-size", type=positive_int, default=default_batch_size,
                   help=f"examples per batch on each process (default: {default_batch_size})")
    g.add_argument("--out", default=default_out, metavar="DIR",
                   help="run folder for config.json, log.jsonl, checkpoints and results "
                        f"(default: {default_out})")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed for initialisation and data order; rank r uses seed+r "
                        "for augmentation (default: 0)")
    g.add_argument("--workers", type=_non_negative_int, default=default_workers(),
                   help="DataLoader worker processes per training process, 0 loads in the "
                        f"main process (default: min(8, CPU count) = {default_workers()})")
    g.add_argument("--device", type=_device_name, default="auto",
                   help=f"where to run: {DEVICE_CHOICES_HELP}; auto picks CUDA when "
                        "available, else CPU (default: auto)")
    return parser


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a ``torch.device``, refusing unavailable CUDA."""
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise DeviceError(f"device {name!r} is not one of {DEVICE_CHOICES_HELP}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was requested but CUDA is not available "
                           f"(torch {torch.__version__}); use --device cpu or auto")
    dev = torch.device(name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} was requested but only "
                           f"{torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


# The toolkit's own errors (bad input, a run that cannot go on) are reported as one line;
# any other exception is a defect and keeps its traceback.
USER_ERRORS = (PiggybackError,)


def run_cli(parser: argparse.ArgumentParser, main, argv=None, check_args=None) -> int:
    """Parse ``argv``, validate with ``check_args(parser, args)`` and run ``main(args)``.

    The toolkit's own errors (:class:`common.errors.PiggybackError`) end with
    ``PROG: error: MESSAGE`` on stderr and exit status 2, as argparse does for bad flags;
    every other exception propagates with its traceback."""
    args = parser.parse_args(argv)
    if check_args is not None:
        args = check_args(parser, args)
    try:
        main(args)
    except USER_ERRORS as exc:
        message = f"{parser.prog}: error: {exc}"
        print(message, file=sys.stderr)
        raise UsageExit(message) from None
    return 0


class UsageExit(SystemExit):
    """Exit status 2 whose str() is the message that was printed (handy in tests)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message
