"""The toolkit's own errors.

Every error that means "bad input" or "this run cannot go on as asked" derives from
:class:`PiggybackError`. Command-line entry points (``common.cli.run_cli``) report exactly
these as one line on stderr with exit status 2; any other exception is a defect and keeps
its traceback. Each class also derives from the built-in exception a caller would expect
(``ValueError`` for bad values, ``FileNotFoundError`` for missing files), so
``except ValueError`` around library calls keeps working.
"""
from __future__ import annotations

__all__ = ["PiggybackError", "UsageError", "DataError", "MissingFileError", "MaskFileError",
           "WeightsFileError", "CheckpointError", "ResumeError", "DivergedError", "DeviceError",
           "RunLockedError"]


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


class DeviceError(PiggybackError, ValueError, RuntimeError):
    """A device that was asked for but is not there."""
