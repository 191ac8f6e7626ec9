"""The one training runner: one task from a frozen configuration into one run folder.

Every training command (``decathlon.train``, ``decathlon.pretrain``, ``classification.train``,
``segmentation.train``) is a :class:`TrainingTask` of its pipeline handed to
:func:`run_training`. A pipeline supplies only what is its own, through ``build_*`` hooks
(as detectron2's trainers do): its data, its model and the names of its new layers, its
loss and evaluation (a :class:`common.engine.Pipeline`), what its artifact and
``metrics.json`` record, and what ``auto`` means for it (an
:class:`~common.runtime.AutoPolicy`). The runner does the rest the same way for all:

1. the run folder is checked and locked from the first check to the last file written;
2. the random generators are seeded, ``auto`` is resolved once
   (:func:`common.runtime.resolve_runtime`); the weights the data depends on are read;
3. the data is built and checked before the model (a data problem never costs a model
   build, an epoch or a run folder), then the model, prepared for its method;
4. optimizers, schedules, compilation; the run's record (``config.json``: every setting,
   and under ``resolved`` what ``auto`` and the pipeline resolved);
5. :func:`common.engine.fit` trains or resumes;
6. :func:`finish_run` writes the artifact, ``metrics.json`` and the pictures. A finished
   run run again writes nothing, except the pictures or metrics it promised and lacks.

Adding a pipeline is one :class:`TrainingTask` subclass and a thin entry point; nothing
here changes.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from common.accounting import sparsity
from common.amp import maybe_channels_last
from common.atomic import remove_stale_temp_files
from common.cli import resolve_threads, resolve_workers
from common.config import config_record
from common.distributed import DistInfo, barrier, cleanup, init_distributed
from common.engine import FitResult, FitState, Pipeline, compile_model, fit
from common.maskfile import RESERVED_KEYS
from common.methods import Method, Prepared, get_method
from common.optimizers import build_optimizers, make_schedulers
from common.plots import expected_plots, save_run_plots
from common.runlog import RunDir
from common.runtime import AutoPolicy, Runtime, resolve_runtime
from common.seed import seed_everything
from common.synthetic import is_synthetic

__all__ = ["TrainingTask", "Data", "run_training", "processes", "start_run", "finish_run", "METRICS"]

METRICS = "metrics.json"


@dataclass
class Data:
    """A task's data: the training loader, the evaluation loader, how the training loader
    is prepared for each epoch, and what the run records of it (counts, the loader kind)."""

    train: Any
    eval: Any
    set_epoch: Callable[[int], None]
    facts: Dict[str, Any] = field(default_factory=dict)


class TrainingTask:
    """What a pipeline supplies to :func:`run_training` (override the hooks)."""

    policy: AutoPolicy = AutoPolicy()

    def __init__(self, cfg, dist: DistInfo, log: Callable[[str], None] = print):
        self.cfg, self.dist, self.log = cfg, dist, log

    # ------------------------------------------------------------ identity
    @property
    def out(self) -> Path:
        """The run folder."""
        return Path(self.cfg.out)

    @property
    def header(self) -> str:
        """What starts the task's progress lines (e.g. ``[svhn] ``)."""
        return ""

    @property
    def method(self) -> Method:
        return get_method(self.cfg.method)

    @property
    def artifact(self) -> str:
        """The file a finished run holds besides metrics.json."""
        return self.method.artifact

    # ------------------------------------------------------------ hooks
    def open_weights(self, runtime: Runtime) -> None:
        """Read the weights the task starts from, when it needs them before its data (the
        backbone file fixes the preprocessing). Runs after the generators are seeded, and
        what it draws (a network's initialisation before its weights load) counts."""

    def build_data(self, runtime: Runtime) -> Data:
        """The loaders; nothing they draw from the global generators reaches the model."""
        raise NotImplementedError

    def build_model(self, runtime: Runtime, data: Data) -> Tuple[nn.Module, Tuple[str, ...], Dict[str, Any]]:
        """(model with its new layers, their names, facts the run records)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, head: Tuple[str, ...]) -> Prepared:
        """Make the model trainable for the task's method (piggyback converts it)."""
        cfg = self.cfg
        return self.method.prepare(model, head=head, masks=cfg.mask_settings(), train_bn=cfg.train_bn)

    def build_optimizers(self, prepared: Prepared, model: nn.Module) -> Dict[str, Any]:
        return build_optimizers(prepared, self.cfg)

    def build_pipeline(self, runtime: Runtime, data: Data, model: nn.Module) -> Pipeline:
        """The loss and the evaluation."""
        raise NotImplementedError

    def announce(self, model: nn.Module, prepared: Prepared, data: Data, runtime: Runtime,
                 facts: Mapping[str, Any]) -> Optional[str]:
        """The line printed before training starts."""
        return None

    def final_evaluation(self, eval_model: nn.Module, data: Data) -> Dict[str, Any]:
        """Metrics measured once after the last epoch (a held-out test split the epochs did
        not see), added to the last epoch's log record and to metrics.json."""
        return {}

    def results(self, model: nn.Module, data: Data, result: FitResult, facts: Mapping[str, Any],
                pipeline: Pipeline) -> Tuple[Dict[str, Any], Dict[str, Any], str]:
        """(the artifact's metadata, metrics.json, the closing line) of a trained run."""
        raise NotImplementedError

    def save(self, run: RunDir, model: nn.Module, meta: Mapping[str, Any]) -> Path:
        """Write the artifact."""
        return self.method.save(model, run.path, **{k: v for k, v in meta.items() if k not in RESERVED_KEYS})

    @property
    def uses_masks(self) -> bool:
        return self.method.uses_masks

    @property
    def no_mask_note(self) -> Optional[str]:
        """What metrics.json says of a run that trained no mask."""
        return f"--method {self.method.name} trains no mask: full weights saved"


@contextlib.contextmanager
def processes(cfg):
    """This process's place in the run (``torchrun`` or one process) and its log function
    (only the first process prints); the process group is closed on the way out."""
    dist = init_distributed(cfg.device, threads=cfg.threads, workers=cfg.workers)
    try:
        yield dist, (partial(print, flush=True) if dist.is_main else (lambda *_: None))
    finally:
        cleanup()


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


@contextlib.contextmanager
def _generators_kept():
    """The global random generators (Python, numpy, torch's CPU one) as they were before."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


def run_training(task: TrainingTask) -> Dict[str, Any]:
    """Train (or resume, or find finished) ``task`` in its run folder; returns its metrics."""
    run = RunDir(task.out, task.dist.is_main)
    run.check_run_folder()
    with run.lock():  # from the first check to the last file written
        if task.dist.is_main:
            remove_stale_temp_files(run.path)  # what a killed write left, of any file
        return _run(run, task)


def _run(run: RunDir, task: TrainingTask) -> Dict[str, Any]:
    cfg, dist, log = task.cfg, task.dist, task.log
    seed_everything(cfg.seed, dist.rank)
    runtime = resolve_runtime(cfg, dist, task.policy)
    task.open_weights(runtime)
    with _generators_kept():  # reading the data (filling a cache, say) draws nothing the model sees
        data = task.build_data(runtime)
    model, head, facts = task.build_model(runtime, data)
    prepared = task.prepare(model, head)
    model = maybe_channels_last(model.to(runtime.device), runtime.prec.channels_last)
    optimizers = task.build_optimizers(prepared, model)
    schedulers = make_schedulers(optimizers, cfg)
    train_model, eval_model = compile_model(model, dist, runtime.compile, dynamic=runtime.dynamic or None)
    record = start_run(cfg, dist, **facts, **data.facts, amp=runtime.prec.amp,
                       channels_last=runtime.prec.channels_last, compile=runtime.compile)
    line = task.announce(model, prepared, data, runtime, record["resolved"])
    if line and dist.is_main:
        log(line)
    pipeline = task.build_pipeline(runtime, data, model)
    started = time.time()
    result = fit(run, FitState(model, optimizers, schedulers, train_model, eval_model, prepared.frozen_modules),
                 pipeline, data.train, epochs=cfg.epochs, config=record, dist=dist, set_epoch=data.set_epoch,
                 print_freq=cfg.print_freq, header=task.header, log=log, may_change=cfg.resume_free(),
                 absent=cfg.absent_settings())
    if _finished(run, task, result):
        return _finished_again(run, task, log)
    extra = task.final_evaluation(eval_model, data)
    if extra:
        result.history[-1].update(extra)
        if run.is_main:
            run.write_log(result.history)
    meta, metrics, summary = task.results(model, data, result, record["resolved"], pipeline)
    return finish_run(run, task, model, meta, metrics, result, started=started, summary=summary)


def _finished(run: RunDir, task: TrainingTask, result: FitResult) -> bool:
    return (result.start_epoch >= len(result.history) and run.file(METRICS).is_file()
            and run.file(task.artifact).is_file())


def _finished_again(run: RunDir, task: TrainingTask, log) -> Dict[str, Any]:
    """A finished run run again: nothing is rewritten; pictures it lacks are drawn."""
    done = run.read_json(METRICS)
    missing = [p for p in expected_plots(run.path) if not p.is_file()]
    if missing and run.is_main:
        save_run_plots(run.path, only=missing)
        log(f"{task.header}already finished; drew the missing {', '.join(p.name for p in missing)} in {run.path}")
    else:
        log(f"{task.header}already finished: {run.path} is unchanged")
    barrier()
    return done


def finish_run(run: RunDir, task: TrainingTask, model: nn.Module, meta: Mapping[str, Any], metrics: Dict[str, Any],
               result: FitResult, *, started: float, summary: str = "") -> Dict[str, Any]:
    """Write the task's artifact (with ``meta`` in its header), ``metrics.json`` and the
    run's pictures; returns the metrics."""
    metrics = dict(metrics, time_s=time.time() - started, result_file=task.artifact)
    if task.uses_masks:
        sp = sparsity(model)
        metrics.update(sparsity=sp["total"], sparsity_layers=sp["layers"], masked_weights=sp["numel"])
    else:
        metrics.update(sparsity=None, note=task.no_mask_note)
    if run.is_main:
        path = task.save(run, model, meta)
        metrics["result_file_bytes"] = path.stat().st_size
        run.write_json(METRICS, metrics)
        save_run_plots(run.path)
    barrier()
    task.log(summary + (f", mask sparsity {metrics['sparsity']:.4f}" if metrics.get("sparsity") is not None else "")
             + (f"; COLLAPSE at step {result.collapse['step']}" if result.collapse else "")
             + f"; results in {run.path}")
    return metrics
