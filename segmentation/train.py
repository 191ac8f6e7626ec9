"""``python -m segmentation.train``: FCN-32s on a masked VGG-16 for PASCAL VOC.

Mixed training (paper section 6, Fig. 4): with ``--method piggyback`` the VGG backbone is
frozen and masked and its real-valued masks train with Adam (``--optimizer``, ``--lr``),
while the new layers (score_fr, and upscore with ``--learn-upsample``) train from scratch
with their own optimizer and learning rate (``--head-optimizer``, ``--head-lr``).
``--method finetune`` trains every backbone weight with ``--optimizer`` instead.

The run folder (``--out``) receives config.json, log.jsonl (one line per epoch),
checkpoint.pt (rewritten after every epoch; the same command resumes from it), the
method's artifact (masks.safetensors or weights.safetensors), metrics.json (FCN metrics
on the evaluation set plus a storage report) and the pictures. Multi-GPU:
``torchrun --nproc_per_node N -m segmentation.train ...``.
"""
from __future__ import annotations

import sys

from common.runner import processes, run_training

from .config import SegmentationConfig
from .training import SegmentationTask

__all__ = ["get_args_parser", "parse_config", "main", "cli"]


def get_args_parser():
    return SegmentationConfig.parser()


def parse_config(argv=None) -> SegmentationConfig:
    return SegmentationConfig.from_cli(argv)


def main(cfg: SegmentationConfig) -> dict:
    with processes(cfg) as (dist, log):
        task = SegmentationTask(cfg, dist, log)
        done = run_training(task)
        log(task.report(done))
        return done


def cli(argv=None) -> int:
    return SegmentationConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
