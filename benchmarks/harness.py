"""Shared machinery of the benchmarks: timing, results, machine description, Markdown.

Timing rules every benchmark follows:

* comparisons are timed side by side in one process: the contenders run in alternating
  rounds (the order rotates every round), so drift in clock speed or in the load of
  other processes on the shared cores hits all of them alike;
* every figure is the median of repeated runs after warm-up, and ratios are the median
  of the per-round ratios, which is robust to a round disturbed by a neighbour.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["Check", "Section", "time_side_by_side", "median", "median_ratio", "machine_info",
           "render_markdown", "fmt", "markdown_path"]


@dataclass
class Check:
    """One figure held to a goal: ``passed`` is None when there is nothing to judge."""

    name: str
    value: str
    goal: str
    passed: Optional[bool]

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]


@dataclass
class Section:
    """A benchmark's results: tables of measurements, goal checks and findings."""

    title: str
    intro: str = ""
    tables: List[tuple] = field(default_factory=list)  # (caption, header, rows)
    checks: List[Check] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self, caption: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
        self.tables.append((caption, list(header), [list(r) for r in rows]))

    def check(self, name: str, value: str, goal: str, passed: Optional[bool]) -> None:
        self.checks.append(Check(name, value, goal, passed))


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a[i] / b[i] (a and b timed in the same round)."""
    return statistics.median(x / y for x, y in zip(a, b))


def time_side_by_side(fns: Dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
                      inner: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each function, ``repeats`` rounds after ``warmup`` rounds.

    Each round calls every function ``inner`` times in a row (for calls too short to
    time alone) and records the mean; the order of the functions rotates per round."""
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            elapsed = (time.perf_counter() - start) / inner
            if r >= warmup:
                times[name].append(elapsed)
    return times


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except ImportError:
        return "not installed"


def machine_info() -> Dict[str, str]:
    import torch
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
        memory = f"{mem:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        memory = "?"
    info = {
        "CPU": _cpu_model(),
        "cores visible": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": memory,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
    }
    for mod in ("torch", "torchvision", "numpy", "timm", "cv2", "safetensors"):
        info[mod] = _version(mod)
    info["CUDA available"] = str(torch.cuda.is_available())
    return info


def fmt(x: float, digits: int = 3) -> str:
    """Numbers for tables: a fixed number of significant digits, thousands separated."""
    if x != x:  # NaN
        return "nan"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def render_markdown(sections: List[Section], machine: Dict[str, str], *, title: str,
                    preamble: str = "") -> str:
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble, ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    lines += ["", "## Summary", "", "| benchmark | figure | measured | goal | verdict |", "|---|---|---|---|---|"]
    for s in sections:
        for c in s.checks:
            lines.append(f"| {s.title} | {c.name} | {c.value} | {c.goal} | **{c.verdict}** |")
    for s in sections:
        lines += ["", f"## {s.title}", ""]
        if s.intro:
            lines += [s.intro, ""]
        for caption, header, rows in s.tables:
            if caption:
                lines += [caption, ""]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            lines.append("")
        if s.checks:
            lines += ["| figure | measured | goal | verdict |", "|---|---|---|---|"]
            lines += [f"| {c.name} | {c.value} | {c.goal} | **{c.verdict}** |" for c in s.checks]
            lines.append("")
        for note in s.notes:
            lines += [note, ""]
        if s.seconds:
            lines += [f"*({s.seconds:.0f} s to measure)*", ""]
    return "\n".join(lines).rstrip() + "\n"


def markdown_path(text: str) -> Path:
    """argparse type: a path ending in .md whose folder exists."""
    path = Path(text)
    if path.suffix.lower() != ".md":
        raise argparse.ArgumentTypeError(f"expected a Markdown file name ending in .md, got {text!r}")
    if not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {path.resolve().parent} of {text!r} does not exist")
    return path
