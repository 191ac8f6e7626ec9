"""What every training command does around ``fit``: the run's record before it, and after
it the task's artifact, ``metrics.json`` and the pictures.

:func:`start_run` turns a configuration into the record ``config.json`` holds (every field,
and under ``resolved`` what the run derived: the values ``auto`` switches took, workers and
threads, the resolved architecture, counts). :func:`finish_task` writes the artifact of the
run's method (:meth:`common.methods.Method.save`), ``metrics.json`` and the pictures
(:func:`common.plots.save_run_plots`), and prints the closing line. A finished run that is
run again changes nothing in its folder.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Mapping

import torch.nn as nn

from common.accounting import sparsity
from common.cli import resolve_threads, resolve_workers
from common.config import config_record
from common.distributed import DistInfo, barrier
from common.maskfile import RESERVED_KEYS
from common.plots import save_run_plots
from common.runlog import RunDir
from common.synthetic import is_synthetic

__all__ = ["start_run", "finish_task", "METRICS"]

METRICS = "metrics.json"


def start_run(cfg, dist: DistInfo, **resolved) -> Dict[str, Any]:
    """The record of ``cfg`` for ``config.json`` and resume checks, with ``resolved`` (and
    the workers, threads and world size this process runs with, and ``synthetic`` when the
    data root is marked so) under ``resolved``."""
    workers = resolve_workers(getattr(cfg, "workers", None))
    facts = {"workers": workers, "threads": resolve_threads(getattr(cfg, "threads", None), workers),
             "world_size": dist.world_size, **resolved}
    if is_synthetic(getattr(cfg, "data_root", None)):
        facts["synthetic"] = True  # the pictures say so (common.synthetic)
    return config_record(cfg, facts)


def finish_task(run: RunDir, model: nn.Module, method, meta: Mapping[str, Any], metrics: Dict[str, Any], result, *,
                started: float, log: Callable[[str], None] = print, summary: str = "") -> Dict[str, Any]:
    """Write the trained task (``method``'s artifact, with ``meta`` in its header),
    ``metrics.json`` and the run's pictures; returns the metrics. When the checkpoint
    already held every epoch and the folder holds its results, nothing is rewritten and
    the metrics on disk are returned. The caller holds the folder's lock
    (``with run.lock():`` around ``fit`` and this)."""
    if result.start_epoch >= len(result.history) and run.file(METRICS).is_file() \
            and run.file(method.artifact).is_file():
        done = run.read_json(METRICS)
        log(f"{summary} (already finished: {run.path} is unchanged)".strip())
        return done
    metrics = dict(metrics, time_s=time.time() - started, result_file=method.artifact)
    if method.uses_masks:
        sp = sparsity(model)
        metrics.update(sparsity=sp["total"], sparsity_layers=sp["layers"], masked_weights=sp["numel"])
    else:
        metrics.update(sparsity=None, note=f"--method {method.name} trains no mask: full weights saved")
    if run.is_main:
        path = method.save(model, run.path, **{k: v for k, v in meta.items() if k not in RESERVED_KEYS})
        metrics["result_file_bytes"] = path.stat().st_size
        run.write_json(METRICS, metrics)
        save_run_plots(run.path)
    barrier()
    log(summary + (f", mask sparsity {metrics['sparsity']:.4f}" if metrics.get("sparsity") is not None else "")
        + (f"; COLLAPSE at step {result.collapse['step']}" if result.collapse else "")
        + f"; results in {run.path}")
    return metrics
