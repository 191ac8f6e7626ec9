"""Run every CPU benchmark and write BENCHMARKS.md: ``python -m benchmarks.run``.

Each benchmark is a module with ``run(quick, context) -> Section``; ``context`` carries
figures one benchmark needs from another (the data benchmark sets the loader's
throughput next to the model's training throughput). The GPU benchmark is a separate
script, ``python -m benchmarks.gpu``, for a machine with an accelerator.
"""
from __future__ import annotations

import importlib
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Tuple

from benchmarks.harness import Section, machine_info, markdown_path, render_markdown
from common.atomic import atomic_write_bytes
from common.settings import Settings, at_least, option

# name -> module; run in this order (the data benchmark reads the training throughput)
BENCHMARKS = {
    "training": "benchmarks.bench_training",
    "inference": "benchmarks.bench_inference",
    "storage": "benchmarks.bench_storage",
    "data": "benchmarks.bench_data",
    "memory": "benchmarks.bench_memory",
    "gpu": "benchmarks.gpu_steps",
    "published": "benchmarks.bench_published",
}
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BenchmarksConfig(Settings):
    PROG: ClassVar[str] = "python -m benchmarks.run"
    DESCRIPTION: ClassVar[str] = "Time and size the piggyback toolkit on this machine's CPU; write BENCHMARKS.md."

    quick: bool = option(False, "fewer rounds and cases (a smoke run; figures are noisier)", type=bool)
    out: str = option(str(REPO_ROOT / "BENCHMARKS.md"), "Markdown report to write", type=markdown_path,
                      default_text="BENCHMARKS.md at the repository root")
    threads: int = option(1, "torch intra-op threads (one: a descheduled second thread distorts timings)", group="runtime", type=int)
    only: Optional[Tuple[str, ...]] = option(None, "run only these benchmarks; the report's other sections stay as "
                                             "they were", nargs="+", choices=tuple(sorted(BENCHMARKS)), metavar="NAME",
                                             default_text="all")

    def check(self) -> None:
        super().check()
        at_least("threads", self.threads, 1)


def get_args_parser():
    return BenchmarksConfig.parser()


def run_benchmarks(names, quick: bool, threads: int):
    context: dict = {"threads": threads}
    sections = []
    for name in names:
        print(f"[benchmarks] {name} ...", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(BENCHMARKS[name])
        section: Section = module.run(quick, context)
        print(f"[benchmarks] {name} done in {time.perf_counter() - start:.0f} s", flush=True)
        for c in section.checks:
            print(f"    {c.verdict:4s}  {c.name}: {c.value} (goal {c.goal})", flush=True)
        sections.append(section)
    return sections


def keep_marked_sections(path: Path, text: str) -> str:
    """``text`` followed by every section of ``path`` between ``<!-- NAME:begin -->`` and
    ``<!-- NAME:end -->`` markers (the real-data section of ``benchmarks.transfer``, the CPU
    threads measurements), which this command does not measure."""
    import re

    from benchmarks.transfer import replace_section
    try:
        old = Path(path).read_text(encoding="utf-8")
    except OSError:
        return text
    for found in re.finditer(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", old, re.S):
        name = found.group(1)
        text = replace_section(text, found.group(0) + "\n", f"<!-- {name}:begin -->", f"<!-- {name}:end -->")
    return text


_NUMBERED = re.compile(r"^## (\d+\. .+)$", re.M)
_SUMMARY_ROWS = re.compile(r"^## Summary\n\n\|.*\n\|---.*\n((?:\|.*\n)*)", re.M)
# where a section's body ends: the next heading or marked section
_SECTION_END = re.compile(r"^(<!-- [\w-]+:begin -->|## )", re.M)


def _report_parts(text: str):
    """A report's summary rows and body per numbered section (``## 1. Training overhead``
    up to the next heading or marked section)."""
    rows: dict = {}
    found = _SUMMARY_ROWS.search(text)
    for line in (found.group(1).splitlines() if found else ()):
        rows.setdefault(line.split("|")[1].strip(), []).append(line)
    bodies = {}
    heads = list(_NUMBERED.finditer(text))
    for i, head in enumerate(heads):
        body = text[head.start():heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        # the body ends at the next heading or marked section after its own heading line
        cut = _SECTION_END.search(body, len(head.group(0)))
        bodies[head.group(1)] = (body[:cut.start()] if cut else body).rstrip() + "\n"
    return rows, bodies


def keep_sections_not_run(old: str, text: str) -> str:
    """``text`` (a report of some benchmarks, ``--only``) with the numbered sections of the
    report ``old`` that it lacks put back, summary rows and bodies, in section order."""
    old_rows, old_bodies = _report_parts(old)
    new_rows, new_bodies = _report_parts(text)
    found = _SUMMARY_ROWS.search(text)
    if found is None or not set(old_bodies) - set(new_bodies):
        return text
    titles = sorted(set(old_bodies) | set(new_bodies), key=lambda t: int(t.split(".")[0]))
    rows = [r for t in titles for r in (new_rows.get(t, []) if t in new_bodies else old_rows.get(t, []))]
    bodies = [new_bodies[t] if t in new_bodies else old_bodies[t] for t in titles]
    return text[:found.start(1)] + "".join(r + "\n" for r in rows) + "\n" + "\n".join(bodies)


def main(args: BenchmarksConfig) -> int:
    import torch
    torch.set_num_threads(args.threads)
    names = [n for n in BENCHMARKS if args.only is None or n in args.only]
    start = time.perf_counter()
    sections = run_benchmarks(names, args.quick, args.threads)
    total = time.perf_counter() - start
    mode = "quick" if args.quick else "full"
    command = f"python -m benchmarks.run{' --quick' if args.quick else ''}"
    if args.only:
        numbers = [s.title.split(".")[0] for s in sections]
        written = (f"Section{'s' if len(numbers) > 1 else ''} {', '.join(numbers)} written by `{command} --only "
                   f"{' '.join(names)}` ({mode} run, {total:.0f} s on the machine below), the others by an earlier "
                   f"call.")
    else:
        written = f"Written by `{command}` ({mode} run, {total:.0f} s on the machine below)."
    preamble = (f"{written} Every comparison is timed side by side in one process; figures are medians of "
                f"repeated runs. The machine's 2 cores may be shared with other work, which shows as noise.")
    text = render_markdown(sections, machine_info(), title="Benchmarks", preamble=preamble)
    if args.only and Path(args.out).is_file():  # the sections not run stay as they were
        text = keep_sections_not_run(Path(args.out).read_text(encoding="utf-8"), text)
    text = keep_marked_sections(args.out, text)
    atomic_write_bytes(args.out, text.encode("utf-8"))
    print(f"[benchmarks] wrote {args.out} ({total:.0f} s)")
    return 0


def cli(argv=None) -> int:
    return BenchmarksConfig.run(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
