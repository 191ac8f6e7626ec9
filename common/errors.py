"""The toolkit's own errors.

Every error that means "bad input" or "this run cannot go on as asked" derives from
:class:`PiggybackError`. Command-line entry points (``common.cli.guarded``) report exactly
these as one line on stderr with exit status 2; any other exception is a defect and keeps
its traceback. Each class also derives from the built-in exception a caller would expect
(``ValueError`` for bad values, ``FileNotFoundError`` for missing files), so
``except ValueError`` around library calls keeps working.
"""
from __future__ import annotations

__all__ = ["PiggybackError", "UsageError", "DataError", "MissingFileError", "MaskFileError",
           "WeightsFileError", "CheckpointError", "ResumeError", "DivergedError", "DeviceError",
           "RunLockedError", "DiskFullError", "Terminated", "interrupted"]


class PiggybackError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class UsageError(PiggybackError, ValueError):
    """A value, flag or combination of settings that cannot be used."""


class RunLockedError(UsageError):
    """A run folder whose lock another live process holds."""


class DataError(PiggybackError, ValueError):
    """A dataset file or folder that is malformed: annotations, images, lists."""


class MissingFileError(PiggybackError, FileNotFoundError):
    """A file or folder that was named but does not exist."""


class MaskFileError(PiggybackError, ValueError):
    """A mask file that cannot be used: unreadable, malformed, or for another backbone."""


class WeightsFileError(PiggybackError, ValueError):
    """A weights file (backbone, finetuned model) that cannot be read or does not fit."""


class CheckpointError(PiggybackError, ValueError):
    """A checkpoint that is missing, unreadable or of another format version."""


class ResumeError(PiggybackError, ValueError):
    """A run folder whose checkpoint was written with settings that differ from the new ones."""


class DivergedError(PiggybackError, FloatingPointError):
    """Training produced a non-finite loss."""


class DiskFullError(PiggybackError, OSError):
    """A file that could not be written for want of space (or quota); ``str()`` is one
    line naming the file, its size and what is intact."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (what batch schedulers and closed terminals send), ending a run the
    way Ctrl-C does; ``signal`` names it."""

    def __init__(self, message: str = "", signal: str = "SIGTERM"):
        super().__init__(message)
        self.signal = signal


_PENDING: list = []  # termination signals received (common.cli's handler notes them)


def note_termination(name: str) -> None:
    """Remember that signal ``name`` asked the process to end."""
    _PENDING.append(name)


def stop_for(name: str) -> KeyboardInterrupt:
    """The exception signal ``name`` ends a command with: Ctrl-C's for SIGINT, else
    :class:`Terminated`."""
    return KeyboardInterrupt() if name == "SIGINT" else Terminated("", name)


def check_termination() -> None:
    """Raise what a signal noted asks for when its exception was lost: Python drops an
    exception raised while it runs a finaliser or a fork callback (a loader worker
    starting, say), and the training loop calls this at every step instead."""
    if _PENDING:
        raise stop_for(_PENDING[-1])


def clear_termination() -> None:
    """Forget the signals noted (a command has ended; the next one in this process starts clean)."""
    _PENDING.clear()


def interrupted(exc: KeyboardInterrupt, message: str) -> KeyboardInterrupt:
    """The same kind of interrupt as ``exc`` (Ctrl-C or a termination signal), saying
    ``message``."""
    if isinstance(exc, Terminated):
        return Terminated(message, exc.signal)
    return KeyboardInterrupt(message)


class DeviceError(PiggybackError, ValueError, RuntimeError):
    """A device that was asked for but is not there."""
