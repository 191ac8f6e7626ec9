"""Progress lines while a loop runs: smoothed meters and the one line per ``print_freq`` steps
with the epoch's ETA (torchvision's ``MetricLogger.log_every``), and the message that names
the step where a loss stopped being finite.
"""
from __future__ import annotations

import datetime
import math
import time
from collections import defaultdict, deque
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import torch

__all__ = ["SmoothedValue", "MetricLogger", "non_finite_message"]


class SmoothedValue:
    """A series of values: window median/average for display, global average to report."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.window: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.window.append(value)
        self.count += n
        self.total += value * n

    def synchronize(self) -> None:
        """Sum count and total over processes (the window stays local)."""
        from common.distributed import all_reduce_sum
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        all_reduce_sum(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.window)).median().item()) if self.window else math.nan

    @property
    def avg(self) -> float:
        return sum(self.window) / len(self.window) if self.window else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else math.nan

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               value=self.value)


def _number(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"MetricLogger.update expects scalars, got a tensor of shape "
                             f"{tuple(value.shape)}")
        return float(value.item())
    return float(value)


class MetricLogger:
    """Named :class:`SmoothedValue` meters and a progress line with ETA."""

    def __init__(self, delimiter: str = "  ", is_main: bool = True,
                 print_fn: Callable[[str], None] = print, window_size: int = 20):
        self.meters: Dict[str, SmoothedValue] = defaultdict(lambda: SmoothedValue(window_size))
        self.delimiter = delimiter
        self.is_main = is_main
        self.print_fn = print_fn

    def update(self, n: int = 1, **values: Any) -> None:
        """Add one value per meter, weighted by ``n`` (e.g. the batch size) in the average."""
        for name, value in values.items():
            self.meters[name].update(_number(value), n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize(self) -> None:
        """Reduce every meter's global average over processes (call on every rank)."""
        for name in sorted(self.meters):
            self.meters[name].synchronize()

    def global_averages(self) -> Dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "") -> Iterator:
        """Yield from ``iterable``, printing a progress line every ``print_freq`` steps."""
        if print_freq < 1:
            raise ValueError(f"print_freq must be >= 1, got {print_freq}")
        try:
            total: Optional[int] = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        width = len(str(total)) if total else 1
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        start = end = time.time()
        i = 0
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            last = total is not None and i == total - 1
            if self.is_main and (i % print_freq == 0 or last):
                parts = [header, f"[{i:>{width}}/{total if total is not None else '?'}]"]
                if total is not None:
                    eta = iter_time.global_avg * (total - i - 1)
                    parts.append(f"eta: {datetime.timedelta(seconds=int(eta))}")
                parts += [str(self), f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                self.print_fn(self.delimiter.join(p for p in parts if p))
            end = time.time()
        if self.is_main:
            elapsed = time.time() - start
            steps = i + 1 if total is None else total
            self.print_fn(f"{header} total time: {datetime.timedelta(seconds=int(elapsed))} "
                          f"({elapsed / max(steps, 1):.4f} s / it)".strip())


def non_finite_message(value: Any, step: int, epoch: Optional[int] = None, detail: str = "") -> str:
    where = f"at epoch {epoch} step {step}" if epoch is not None else f"at step {step}"
    return (f"non-finite loss {value} {where}{detail}; stopping the run "
            f"(lower the learning rate or check the data)")
