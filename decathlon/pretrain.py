"""``python -m decathlon.pretrain``: train the shared backbone on imagenet12 (64 x 64).

The paper's ImageNet-trained WRN-28-4 is not published, so this trains one from the
decathlon's own ImageNet split (the decathlon's published ResNet-26 is read by
``decathlon.import_backbone`` instead). The run folder gets ``config.json``, ``log.jsonl``,
``checkpoint.pt`` (resumable: run the same command again), ``metrics.json``, the pictures
and ``backbone.safetensors``, the file ``decathlon.train --backbone`` takes (weights,
architecture, preprocessing and validation top-1). Multi-GPU: ``torchrun --nproc_per_node N
-m decathlon.pretrain ...``.
"""
from __future__ import annotations

import sys
from typing import Any, Dict

from common.runner import processes, run_training
from decathlon.config import DecathlonPretrainConfig
from decathlon.training import PretrainTask

__all__ = ["get_args_parser", "parse_config", "main", "cli"]


def get_args_parser():
    return DecathlonPretrainConfig.parser()


def parse_config(argv=None) -> DecathlonPretrainConfig:
    return DecathlonPretrainConfig.from_cli(argv)


def main(cfg: DecathlonPretrainConfig) -> Dict[str, Any]:
    with processes(cfg) as (dist, log):
        return run_training(PretrainTask(cfg, dist, log))


def cli(argv=None) -> int:
    return DecathlonPretrainConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
