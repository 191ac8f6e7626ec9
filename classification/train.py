"""``python -m classification.train``: the paper's section 4 setting. A new classification
task on an ImageNet-trained torchvision or timm network, by piggyback masks or one of
the paper's baselines, over an ImageFolder tree.

The run folder ``--out`` receives ``config.json``, ``log.jsonl`` (one line per epoch),
``checkpoint.pt`` (after every epoch; the same command resumes from it), the method's
artifact (``masks.safetensors`` for piggyback: packed masks, new classifier, task BN;
``weights.safetensors`` for the baselines), ``metrics.json`` (top-1, mask sparsity in total
and per layer, collapse if any) and the pictures ``curves.png`` and ``sparsity.png``
(weights masked out per layer, the paper's Fig. 3). The weight file is only read.
Multi-GPU: ``torchrun --nproc_per_node N -m classification.train ...``.
"""
from __future__ import annotations

import sys
from typing import Any, Dict

from common.runner import processes, run_training
from classification.config import ClassificationConfig
from classification.training import ClassificationTask

__all__ = ["get_args_parser", "parse_config", "main", "cli"]


def get_args_parser():
    return ClassificationConfig.parser()


def parse_config(argv=None) -> ClassificationConfig:
    return ClassificationConfig.from_cli(argv)


def main(cfg: ClassificationConfig) -> Dict[str, Any]:
    with processes(cfg) as (dist, log):
        return run_training(ClassificationTask(cfg, dist, log))


def cli(argv=None) -> int:
    return ClassificationConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
