"""The training engine every pipeline uses: one epoch loop, one resumable ``fit``.

A pipeline supplies a :class:`Pipeline` (its batch step, its evaluation, how its epoch
metrics read) and a :class:`FitState` (model, optimizers, schedulers); the engine does
the rest the same way for decathlon, segmentation and classification:

- **No host synchronisation per step.** The loss sum, the example count and the
  pipeline's counts (e.g. correct predictions) are summed on the device. They are read
  every ``print_freq`` steps and at the end of the epoch (one read each), which is when
  the progress line is printed, the non-finite-loss guard is checked and the collapse
  monitor (:mod:`common.collapse`) sees a window. Each step's loss stays in a device
  buffer (one copy per step), so the :class:`DivergedError` names the exact first step
  whose loss was not finite even though it is read later.
- **Resume.** ``fit`` writes a training checkpoint (:mod:`common.checkpoint`) after every
  epoch. Run again on the same folder it compares *every* setting of the new config with
  the checkpoint's, except those free to change (:mod:`common.resume`), restores model,
  optimizers, schedulers, collapse monitor and each rank's own RNG state, rewrites
  log.jsonl to exactly the epochs the checkpoint holds, and continues at the next epoch.
- **Run folder hygiene.** Nothing is written before the settings are accepted; leftovers
  of killed atomic writes are removed on start; a folder this call created is removed
  again when the run fails before its first checkpoint.
- **torch.compile** (``compile_model``): the model is compiled once; training (through
  DDP when distributed) and evaluation call the same compiled module, so there is one
  graph for training mode and one for evaluation, and none per step or epoch. A new
  network (the next task) starts from an empty compile cache.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from common.accounting import sparsity
from common.checkpoint import (load_trainable_state, rng_state, save_training_checkpoint, set_rng_state,
                               trainable_state)
from common.collapse import CollapseMonitor
from common.distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, gather_object, wrap_ddp
from common.errors import DiskFullError, DivergedError, check_termination, interrupted
from common.masking import backbone_fingerprint, is_piggybacked
from common.atomic import remove_stale_temp_files, to_jsonable
from common.meters import MetricLogger, non_finite_message
from common.resume import CHECKPOINT, MAY_CHANGE_ON_RESUME, resume_point
from common.runlog import RunDir

__all__ = ["StepOutput", "Pipeline", "FitState", "FitResult", "train_one_epoch", "fit",
           "MAY_CHANGE_ON_RESUME", "compile_model", "compile_for_eval", "EVAL_COMPILE_MODES", "EVAL_COMPILE_HELP",
           "CHECKPOINT"]

_NO_BAD_STEP = 2 ** 62


@dataclass
class StepOutput:
    """One training batch: its mean ``loss`` (with graph), its number of examples
    (``count``, the loss's weight in the epoch mean) and counts to sum over the epoch
    on the device (e.g. ``{"correct": tensor}``)."""

    loss: torch.Tensor
    count: int
    sums: Dict[str, torch.Tensor] = field(default_factory=dict)


class Pipeline:
    """What a pipeline supplies to the engine (subclass and override).

    ``chance`` and ``accuracy_key`` switch on the accuracy check of the collapse monitor:
    ``sums[accuracy_key] / count`` is the training accuracy, ``chance`` that of guessing.
    """

    chance: Optional[float] = None
    accuracy_key: Optional[str] = None

    def train_step(self, model: nn.Module, batch: Any) -> StepOutput:
        """Forward one batch (moving it to the device) and return its loss."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Dict[str, Any]:
        """Metrics of ``model`` (in eval mode) on the evaluation set, reduced over ranks."""
        raise NotImplementedError

    def train_metrics(self, sums: Dict[str, float], count: float) -> Dict[str, float]:
        """Epoch training metrics from the reduced ``sums`` (the loss is the engine's)."""
        return {}

    def log_metrics(self, evaluation: Mapping[str, Any]) -> Dict[str, Any]:
        """What of ``evaluate``'s result goes into the epoch's log record."""
        return {k: v for k, v in evaluation.items() if v is None or isinstance(v, (bool, int, float, str))}

    def describe(self, record: Mapping[str, Any]) -> str:
        """The end-of-epoch line's metrics."""
        return f"train loss {record['train_loss']:.4f}"


@dataclass
class FitState:
    """What ``fit`` trains and checkpoints. ``model`` is the bare model (its trainable
    state goes into the checkpoint); ``train_model``/``eval_model`` are what the loops
    call (DDP and/or compiled wrappers; default ``model``)."""

    model: nn.Module
    optimizers: Dict[str, torch.optim.Optimizer]
    schedulers: Dict[str, Any] = field(default_factory=dict)
    train_model: Optional[nn.Module] = None
    eval_model: Optional[nn.Module] = None
    frozen_modules: Sequence[nn.Module] = ()

    def __post_init__(self):
        self.train_model = self.train_model if self.train_model is not None else self.model
        self.eval_model = self.eval_model if self.eval_model is not None else self.model


@dataclass
class FitResult:
    record: Dict[str, Any]  # the last epoch's log record
    history: List[Dict[str, Any]]  # every epoch's record
    evaluation: Optional[Dict[str, Any]]  # evaluate() of the last epoch run by this call, if any
    collapse: Optional[Dict[str, Any]]  # the first collapse seen, if any
    start_epoch: int  # epochs the checkpoint held when this call started


def compile_model(model: nn.Module, dist: DistInfo, enabled, *, backend: Optional[str] = None,
                  dynamic: Optional[bool] = None):
    """(train_model, eval_model): ``model`` compiled once when ``enabled`` and wrapped in
    DDP for training when the run is distributed; evaluation calls the same compiled
    module (one more graph, for eval mode without gradients, compiled on first use).
    ``dynamic=True`` compiles for varying input sizes from the start (segmentation).

    The graphs of networks compiled before in this process are dropped first. A process
    trains one network at a time (``decathlon.train --task all``: one per task, in turn),
    and without the reset every task would add its graphs to the same forward's cache:
    from the fifth task on, torch's recompile limit (8) would make it run eagerly."""
    if not enabled:
        return wrap_ddp(model, dist), model
    torch.compiler.reset()
    options = {"backend": backend} if backend else {}
    if isinstance(enabled, str):  # a torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)
        options["mode"] = enabled
    compiled = torch.compile(model, dynamic=dynamic, **options)
    if options.get("mode") == "reduce-overhead":
        # Every call of the loops is a new step: CUDA graph outputs of the previous call
        # may then be overwritten (the loops keep none of them).
        compiled.register_forward_pre_hook(_new_cudagraph_step)
    return wrap_ddp(compiled, dist), compiled


def _new_cudagraph_step(module: nn.Module, args) -> None:
    torch.compiler.cudagraph_mark_step_begin()


# --compile of the evaluation entry points: auto = off (see EVAL_COMPILE_HELP)
EVAL_COMPILE_MODES = {"auto": False, "off": False, "on": True, "cudagraphs": "reduce-overhead"}
EVAL_COMPILE_HELP = ("torch.compile the network for this evaluation: on (default mode), cudagraphs "
                     "(mode reduce-overhead), off; auto = off: compiling pays back only over far more "
                     "images than an evaluation sees (BENCHMARKS-gpu.md) (default: auto)")


def compile_for_eval(model: nn.Module, choice: str, *, dynamic: Optional[bool] = None) -> nn.Module:
    """``model`` as an evaluation entry point's ``--compile`` asks (``EVAL_COMPILE_MODES``).
    As in :func:`compile_model`, graphs of networks compiled before are dropped first: a
    command that evaluates one network after another (decathlon.submit's tasks) compiles
    each once, and none of them runs into torch's recompile limit."""
    if choice not in EVAL_COMPILE_MODES:
        raise ValueError(f"--compile {choice!r}: expected one of {', '.join(EVAL_COMPILE_MODES)}")
    return compile_model(model, DistInfo(), EVAL_COMPILE_MODES[choice], dynamic=dynamic)[1]


class _Accumulator:
    """Device-side record of one epoch, and the guard on the first non-finite loss.

    Each step costs one copy per recorded value: the loss and each count land in row
    ``step`` of preallocated device buffers (no reduction or comparison per step: fewer
    kernel launches in a step that, at batch 32 under CUDA graphs, lasts about 4 ms). The
    examples per step are host numbers already and stay on the host. ``read`` reduces the buffers:
    sums, and the first step whose loss was not finite, so the error still names it."""

    def __init__(self, device: torch.device, steps: int):
        self.device = device
        self.capacity = max(int(steps), 1)
        self.losses = torch.zeros(self.capacity, dtype=torch.float64, device=device)
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: List[int] = []

    def _grow(self) -> None:  # a loader longer than its len(): rare, doubles the buffers
        self.capacity *= 2
        self.losses = torch.cat([self.losses, torch.zeros_like(self.losses)])
        self.sums = {k: torch.cat([v, torch.zeros_like(v)]) for k, v in self.sums.items()}

    def add(self, out: StepOutput) -> None:
        step = len(self.counts)
        if step == self.capacity:
            self._grow()
        self.losses[step].copy_(out.loss.detach())
        for key, value in out.sums.items():
            if key not in self.sums:
                self.sums[key] = torch.zeros(self.capacity, dtype=torch.float64, device=self.device)
            self.sums[key][step].copy_(value.detach())
        self.counts.append(int(out.count))

    def read(self) -> Dict[str, Any]:
        """One host read of everything, reduced over ranks (first bad step: the minimum)."""
        n = len(self.counts)
        keys = sorted(self.sums)
        losses = self.losses[:n]
        counts = torch.tensor(self.counts, dtype=torch.float64).to(self.device)
        bad_steps = ~torch.isfinite(losses)
        # argmax returns the first maximum: the first non-finite step, when there is one
        first = bad_steps.to(torch.int64).argmax() if n else torch.zeros((), dtype=torch.int64, device=self.device)
        any_bad = bad_steps.any()
        bad = torch.where(any_bad, first, torch.full_like(first, _NO_BAD_STEP))
        bad_value = losses[first] if n else torch.zeros((), dtype=torch.float64, device=self.device)
        totals = all_reduce_sum(torch.stack([(losses * counts).sum(), *(self.sums[k][:n].sum() for k in keys),
                                             counts.sum()]))
        worst = all_reduce_max(torch.stack([-bad]))
        values = torch.cat([totals, worst.double(), bad.double().view(1), bad_value.view(1)]).tolist()
        first_bad = int(-values[len(keys) + 2])
        return {"loss_sum": values[0], "sums": dict(zip(keys, values[1:len(keys) + 1])),
                "count": values[len(keys) + 1], "first_bad": None if first_bad >= _NO_BAD_STEP else first_bad,
                "bad_here": int(values[len(keys) + 3]) == first_bad, "bad_value": values[len(keys) + 4]}


def _set_train_mode(model: nn.Module, frozen: Sequence[nn.Module]) -> None:
    model.train()
    # Layers a method keeps fixed (BN of the classifier-only baseline) keep using their
    # running statistics.
    for m in frozen:
        m.eval()


def train_one_epoch(model: nn.Module, loader, pipeline: Pipeline,
                    optimizers: Mapping[str, torch.optim.Optimizer], *, device: torch.device, epoch: int,
                    step_offset: int = 0, frozen_modules: Sequence[nn.Module] = (), print_freq: int = 50,
                    is_main: bool = True, header: str = "", log: Callable[[str], None] = print,
                    monitor: Optional[CollapseMonitor] = None) -> Dict[str, Any]:
    """One pass over ``loader``; returns the epoch's mean ``train_loss``, the pipeline's
    ``train_metrics``, ``steps``, ``step_time_s`` and any ``collapse`` seen, all reduced
    over processes. ``epoch`` is 1-based; steps are counted from 0 within the epoch, and
    from ``step_offset`` over the run (the collapse step). A non-finite loss raises
    :class:`DivergedError` naming the first step where it happened."""
    if print_freq < 1:
        raise ValueError(f"print_freq must be >= 1, got {print_freq}")
    _set_train_mode(model, frozen_modules)
    optimizers = list(optimizers.values())
    logger = MetricLogger(is_main=is_main, print_fn=log)
    total = len(loader)
    acc = _Accumulator(device, total)
    window = {"last": {"loss_sum": 0.0, "sums": {}, "count": 0.0}, "start": 0, "collapse": None}

    def close_window(i: int) -> None:
        """The one host read of a window ending at step ``i`` (log_every prints right after)."""
        last, now = window["last"], acc.read()
        if now["first_bad"] is not None:
            detail = "" if now["bad_here"] else " (on another process)"
            value = now["bad_value"] if now["bad_here"] else float("nan")
            raise DivergedError(non_finite_message(value, now["first_bad"], epoch, detail))
        n = now["count"] - last["count"]
        window_loss = (now["loss_sum"] - last["loss_sum"]) / n if n else float("nan")
        meters = {"loss": window_loss}
        accuracy = None
        key = pipeline.accuracy_key
        if key is not None and key in now["sums"] and n:
            accuracy = (now["sums"][key] - last["sums"].get(key, 0.0)) / n
            meters["acc"] = 100 * accuracy
        logger.update(n=max(int(n), 1), **meters)
        if monitor is not None:
            event = monitor.update(loss=window_loss, steps=i + 1 - window["start"], step=step_offset + i,
                                   epoch=epoch, accuracy=accuracy, examples=int(n))
            if event is not None:
                window["collapse"] = event
                if is_main:
                    log(f"{header} COLLAPSE at step {event['step']} (epoch {epoch} step {i}): {event['reason']}")
        window.update(last=now, start=i + 1)

    steps = 0
    start = time.perf_counter()
    try:
        for i, batch in enumerate(logger.log_every(loader, print_freq, header)):
            check_termination()
            out = pipeline.train_step(model, batch)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            out.loss.backward()
            for opt in optimizers:
                opt.step()
            acc.add(out)
            steps = i + 1
            if i % print_freq == 0 or i == total - 1:
                close_window(i)
    except KeyboardInterrupt as exc:
        raise interrupted(exc, f"in epoch {epoch} at step {steps} of {total}") from None
    if steps > window["start"]:  # a loader that ran past its len()
        close_window(steps - 1)
    elapsed = time.perf_counter() - start
    last, collapse = window["last"], window["collapse"]
    count = last["count"]
    stats = {"train_loss": last["loss_sum"] / count if count else float("nan"),
             **pipeline.train_metrics(last["sums"], count),
             "steps": steps, "step_time_s": elapsed / max(steps, 1)}
    if collapse is not None:
        stats["collapse"] = collapse
    return stats


def fit(run: RunDir, state: FitState, pipeline: Pipeline, train_loader, *, epochs: int,
        config: Mapping[str, Any], dist: DistInfo, set_epoch: Callable[[int], None],
        print_freq: int = 50, header: str = "", log: Callable[[str], None] = print,
        may_change: Sequence[str] = (), monitor: Optional[CollapseMonitor] = None,
        absent: Optional[Mapping[str, Any]] = None) -> FitResult:
    """Train to ``epochs`` in ``run`` (resuming from its checkpoint when one exists).

    ``config`` is the run's configuration record (:func:`common.config.config_record`): it
    is written to config.json, and a resume is refused when any key differs from the
    checkpoint's except ``epochs`` (which may only grow) and ``may_change`` (the fields the
    configuration declares free, e.g. ``RunConfig.resume_free()``); a setting the checkpoint
    lacks counts as ``absent`` says (``Settings.absent_settings()``). ``set_epoch(e)`` prepares the
    loader for 0-based epoch ``e`` (sampler order, worker seeds). The model is expected
    on its device already.
    """
    config = to_jsonable(dict(config))
    may_change = MAY_CHANGE_ON_RESUME | set(may_change)
    run.check_run_folder()  # a folder of the user's is refused, untouched
    model = state.model
    fingerprint = backbone_fingerprint(model) if is_piggybacked(model) else None
    ckpt = resume_point(run, config, epochs, fingerprint, may_change, absent or {})
    monitor = monitor or CollapseMonitor(pipeline.chance)
    history: List[Dict[str, Any]] = []
    start = 0
    if ckpt is not None:
        load_trainable_state(model, ckpt["model"], str(run.file(CHECKPOINT)))
        for name, opt in state.optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        for name, sch in state.schedulers.items():
            sch.load_state_dict(ckpt["schedulers"][name])
        monitor.load_state_dict(ckpt["monitor"])
        history, start = list(ckpt["history"]), int(ckpt["epoch"])
        set_rng_state(ckpt["rng"][dist.rank], dist.device)  # each rank its own generators
    created = run.create()
    taken = run.acquire_lock()  # a caller holding it (``with run.lock():``) keeps it past the return
    saved, epoch, checkpointed = False, start, start
    try:
        if run.is_main and (ckpt is None or start < epochs):  # a finished run re-run changes nothing
            remove_stale_temp_files(run.path)
            run.write_config(config)
            run.write_log(history)
        if ckpt is not None and dist.is_main:
            log(f"{header}resumed from {run.file(CHECKPOINT)} after epoch {start}")
        steps_per_epoch = len(train_loader)
        evaluation, t_run = None, time.perf_counter()
        for epoch in range(start, epochs):
            set_epoch(epoch)
            t0 = time.perf_counter()
            stats = train_one_epoch(state.train_model, train_loader, pipeline, state.optimizers,
                                    device=dist.device, epoch=epoch + 1, step_offset=epoch * steps_per_epoch,
                                    frozen_modules=state.frozen_modules, print_freq=print_freq,
                                    is_main=dist.is_main, header=f"{header}epoch {epoch + 1}/{epochs}",
                                    log=log, monitor=monitor)
            lrs = {name: opt.param_groups[0]["lr"] for name, opt in state.optimizers.items()}
            for sch in state.schedulers.values():
                sch.step()
            state.eval_model.eval()
            evaluation = pipeline.evaluate(state.eval_model)
            check_termination()
            collapse = stats.pop("collapse", None)
            record = {"epoch": epoch + 1, **stats, **pipeline.log_metrics(evaluation), "lr": lrs,
                      "epoch_time_s": time.perf_counter() - t0}
            if is_piggybacked(model):
                record["sparsity"] = sparsity(model)["total"]
            if collapse is not None:
                record["collapse"] = collapse
            record = to_jsonable(record)
            history.append(record)
            rngs = gather_object(rng_state(dist.device))
            if dist.is_main:
                try:
                    save_training_checkpoint(run.file(CHECKPOINT), epoch=epoch + 1, model=trainable_state(model),
                                             optimizers=state.optimizers, schedulers=state.schedulers, rng=rngs,
                                             config=config, history=history, monitor=monitor.state_dict(),
                                             fingerprint=fingerprint)
                except DiskFullError as full:
                    held = f"it holds epoch {checkpointed}" if checkpointed else "no epoch was checkpointed"
                    raise DiskFullError(full.errno, f"{header}{full}; {held}", full.filename) from None
                run.log_epoch(record)  # after the checkpoint: the log never runs ahead of it
            saved, checkpointed = True, epoch + 1
            barrier()
            per_epoch = (time.perf_counter() - t_run) / (epoch + 1 - start)
            eta = datetime.timedelta(seconds=int(per_epoch * (epochs - epoch - 1)))
            if dist.is_main:
                log(f"{header}epoch {epoch + 1}/{epochs}: {pipeline.describe(record)}  "
                    f"({record['epoch_time_s']:.1f}s, ETA {eta})")
    except KeyboardInterrupt as exc:
        if created and not saved:
            run.discard()
        if taken:
            run.release_lock()
        # what the checkpoint on disk holds (an interrupt while it was written keeps the one before)
        kept = f"the checkpoint holds epoch {checkpointed}" if checkpointed else "no epoch was checkpointed"
        # a signal outside the training steps carries no message: say where the run was
        where = str(exc) or (f"after epoch {epoch + 1}" if len(history) > epoch else f"in epoch {epoch + 1}")
        raise interrupted(exc, f"{header}{where}; {kept}: re-run the same command to resume") from None
    except BaseException:
        if created and not saved:
            run.discard()
        if taken:
            run.release_lock()
        raise
    if taken:
        run.release_lock()
    return FitResult(record=history[-1], history=history, evaluation=evaluation,
                     collapse=monitor.event, start_epoch=start)
