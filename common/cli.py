"""Running a command: device names, CPU threads and workers, and how a command ends.

Every entry point is ``parse -> settings -> main(settings)`` through :func:`guarded`
(:meth:`common.settings.Settings.run`), which turns the toolkit's own errors (:class:`common.errors.PiggybackError`)
into one line on stderr with exit status 2, an interrupt (Ctrl-C) into one line saying how
to resume, and an operating-system error on a file (a read-only folder, a full disk) into
one line naming the path; every other exception is a defect and keeps its traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
from typing import Callable, Optional, Tuple

import torch

from .errors import (DeviceError, PiggybackError, Terminated, UsageError, clear_termination, note_termination,
                     stop_for)

__all__ = ["resolve_device", "guarded", "Parser", "USER_ERRORS", "positive_int", "DeviceError", "DEVICE_CHOICES_HELP",
           "check_device_name", "usable_cores", "resolve_workers", "resolve_threads", "apply_threads",
           "UsageExit", "Interrupted"]

DEVICE_CHOICES_HELP = "auto|cpu|cuda|cuda:N"
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def check_device_name(name) -> str:
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise UsageError(f"--device {name!r}: expected {DEVICE_CHOICES_HELP}")
    return name


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a ``torch.device``, refusing unavailable CUDA."""
    if not isinstance(name, str) or not _DEVICE_RE.match(name):
        raise DeviceError(f"device {name!r} is not one of {DEVICE_CHOICES_HELP}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} was requested but CUDA is not available "
                          f"(torch {torch.__version__}); use --device cpu or auto")
    dev = torch.device(name)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} was requested but only "
                          f"{torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


# ------------------------------------------------------------------ threads and workers

def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), shared among the processes
    torchrun started on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local))


def resolve_workers(workers: Optional[int]) -> int:
    """``--workers``: as given, else half the usable cores, at most 8 (the other half runs
    torch's threads)."""
    return int(workers) if workers is not None else min(8, usable_cores() // 2)


def resolve_threads(threads: Optional[int], workers: int) -> int:
    """``--threads``: as given, else ``OMP_NUM_THREADS`` when the environment sets it to a
    positive number, else the usable cores less the loader workers, at least 1, so that
    threads and workers together do not oversubscribe the cores."""
    if threads is not None:
        return int(threads)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, usable_cores() - int(workers))


def apply_threads(threads: Optional[int], workers: Optional[int]) -> Tuple[int, int]:
    """Set torch's CPU threads for this process; returns (workers, threads) as resolved."""
    w = resolve_workers(workers)
    t = resolve_threads(threads, w)
    if torch.get_num_threads() != t:
        torch.set_num_threads(t)
    return w, t


# ------------------------------------------------------------------ how a command ends

# The toolkit's own errors (bad input, a run that cannot go on) are reported as one line;
# any other exception is a defect and keeps its traceback.
USER_ERRORS = (PiggybackError,)


class UsageExit(SystemExit):
    """Exit status 2 whose str() is the message that was printed (handy in tests)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Interrupted(UsageExit):
    """Ctrl-C (exit status 130) or a termination signal (128 + its number): one line saying
    where the run stopped."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message, code)


# OS errors on files that a user's disk or folder causes, not the code
_DISK_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST}


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors print one usage line and the error, not the whole
    usage block; ``--help`` shows everything."""

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [options]  (--help lists them)\n{self.prog}: error: {message}\n")


def guarded(prog: str, body: Callable[[], object]) -> int:
    """Run ``body()``. The toolkit's own errors end with ``PROG: error: MESSAGE`` on stderr
    and exit status 2 (as argparse does for bad flags); Ctrl-C with one line and status
    130; an OS error on a file (permission, read-only or full disk) with one line naming
    the path and the reason. Every other exception propagates with its traceback."""
    previous = _catch_termination()
    try:
        body()
    except USER_ERRORS as exc:
        message = f"{prog}: error: {exc}"
        print(message, file=sys.stderr)
        raise UsageExit(message) from None
    except KeyboardInterrupt as exc:
        where = str(exc) if str(exc) else "before training started"
        if isinstance(exc, Terminated):
            message = f"{prog}: stopped by {exc.signal} {where}"
            print(message, file=sys.stderr)
            raise Interrupted(message, 128 + getattr(signal, exc.signal)) from None
        message = f"{prog}: interrupted {where}"
        print(message, file=sys.stderr)
        raise Interrupted(message) from None
    except OSError as exc:
        if exc.errno not in _DISK_ERRNOS or exc.filename is None:
            raise
        message = f"{prog}: error: cannot write or read {exc.filename}: {exc.strerror}"
        print(message, file=sys.stderr)
        raise UsageExit(message) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if previous and sys.unraisablehook is _quiet_termination:
            sys.unraisablehook = _quiet_termination.previous
        clear_termination()
    return 0


_TERMINATING = ("SIGINT", "SIGTERM", "SIGHUP")


def _terminate(signum, frame):
    name = signal.Signals(signum).name
    note_termination(name)  # checked again at every step, should this exception be dropped
    raise stop_for(name)


def _catch_termination() -> dict:
    """SIGTERM and SIGHUP raise :class:`Terminated` (ending a run as Ctrl-C does: one line,
    the checkpoint's epoch, the lock released, loader workers stopped), and Ctrl-C its
    KeyboardInterrupt; each is also noted, so that one arriving where Python cannot raise
    still ends the run at the next step. A signal the process was told to ignore (``nohup``
    ignores SIGHUP) stays ignored. Returns the handlers replaced. Only the main thread can
    do this; elsewhere nothing changes."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for name in _TERMINATING:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, _terminate)
    if previous and sys.unraisablehook is not _quiet_termination:
        _quiet_termination.previous = sys.unraisablehook
        sys.unraisablehook = _quiet_termination
    return previous


def _quiet_termination(unraisable):
    """A stop Python could not raise (the signal came during a finaliser or a fork callback)
    is not printed: the signal is noted and the next step ends the run."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        _quiet_termination.previous(unraisable)


_quiet_termination.previous = sys.__unraisablehook__
