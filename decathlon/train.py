"""``python -m decathlon.train``: learn one decathlon task (or all nine) on a frozen backbone.

For each task the run folder ``OUT/<task>/`` receives ``config.json``, ``log.jsonl`` (one
line per epoch), ``checkpoint.pt`` (rewritten after every epoch; the same command resumes
from it), then the method's artifact (``masks.safetensors`` for piggyback: bit-packed
masks, new classifier, task BN; ``weights.safetensors`` for the baselines),
``metrics.json`` and the pictures. The backbone file is only read. Multi-GPU:
``torchrun --nproc_per_node N -m decathlon.train ...``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict

from common.atomic import atomic_write_json
from common.runner import processes, run_training
from decathlon.config import DecathlonTrainConfig
from decathlon.tasks import MASK_TASKS
from decathlon.training import DecathlonTask

__all__ = ["get_args_parser", "parse_config", "main", "cli"]


def get_args_parser():
    return DecathlonTrainConfig.parser()


def parse_config(argv=None) -> DecathlonTrainConfig:
    return DecathlonTrainConfig.from_cli(argv)


def main(cfg: DecathlonTrainConfig) -> Dict[str, Any]:
    with processes(cfg) as (dist, log):
        tasks = list(MASK_TASKS) if cfg.task == "all" else [cfg.task]
        results = {t: run_training(DecathlonTask(cfg.replace(task=t) if t != cfg.task else cfg, dist, log))
                   for t in tasks}
        if len(tasks) > 1 and dist.is_main:
            atomic_write_json(Path(cfg.out) / "summary.json", results)
        return results


def cli(argv=None) -> int:
    return DecathlonTrainConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
