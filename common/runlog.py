"""Run folders, atomic file writes, progress logging and the non-finite-loss guard.

A run folder holds ``config.json`` (the resolved configuration plus git commit, torch
version and command line), ``log.jsonl`` (one JSON object per epoch) and whatever JSON
results a pipeline writes. Only the main process writes; on other ranks every writing
method is a no-op, so training loops call them unconditionally. The folder itself is
created by the first write (or :meth:`RunDir.create`), never by the constructor, so a run
refused while it checks its settings leaves nothing behind.

A run folder belongs to one run at a time: :meth:`RunDir.lock` takes an exclusive
``flock`` on ``OUT/.lock`` (creating the folder, since a run that takes the lock is about
to write there), records the holder's PID and command line in it, and refuses a second
process with :class:`RunLockedError` naming the holder. The kernel drops the lock when
the holding process dies, however it dies, so a run killed with SIGKILL never blocks
the next one. :func:`check_run_folder` refuses to write into a folder of the user's that
is not a run folder.

Atomic writes go through a temporary file ``.<name>.<random>.tmp`` in the destination
folder; a process killed mid-write leaves one behind, which
:func:`remove_stale_temp_files` clears when the next run starts in that folder.

JSON written here is strict: NaN/inf become ``null`` (e.g. the IoU of a class absent
from the evaluation set), tensors and numpy scalars become numbers.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

import torch

from common.errors import DataError, DivergedError, MissingFileError, RunLockedError, UsageError

__all__ = [
    "atomic_write_bytes", "atomic_write_json", "to_jsonable", "git_commit", "RunDir",
    "SmoothedValue", "MetricLogger", "check_finite", "file_sha256", "non_finite_message", "remove_stale_temp_files",
    "check_run_folder", "LOCK_NAME",
]

PathLike = Union[str, os.PathLike]

# Read once: os.umask can only be queried by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder + ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write; the
    temporary file is removed if anything fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# The names atomic_write_bytes gives its temporary files: "." + target name + "." +
# mkstemp's random part + ".tmp".
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def remove_stale_temp_files(folder: PathLike) -> List[Path]:
    """Delete the temporary files of atomic writes that a killed process left in
    ``folder`` (not in sub-folders); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if _TEMP_RE.match(path.name) and path.is_file():
            try:
                path.unlink()
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (torch.device, torch.dtype, os.PathLike)):
        return str(obj)
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar / 0-d array
        return to_jsonable(obj.tolist() if hasattr(obj, "tolist") else obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot write a {type(obj).__name__} ({obj!r}) as JSON")


def atomic_write_json(path: PathLike, obj: Any, indent: Optional[int] = 2) -> Path:
    """Write ``obj`` as strict JSON (NaN/inf -> null) to ``path`` atomically."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def git_commit() -> Optional[str]:
    """Commit hash of the checkout holding this code (``+dirty`` if modified), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = sha.stdout.strip()
    if status.returncode == 0 and status.stdout.strip():
        commit += "+dirty"
    return commit or None


LOCK_NAME = ".lock"
_CHECKPOINT_NAME = "checkpoint.pt"  # common.engine.CHECKPOINT (engine imports this module)
_PROVENANCE_KEYS = ("git_commit", "torch_version", "command_line")


def _is_housekeeping(name: str) -> bool:
    """The lock file and leftovers of atomic writes: present in any run folder."""
    return name == LOCK_NAME or bool(_TEMP_RE.match(name))


def _written_by_a_run(config_path: Path) -> bool:
    """Whether ``config.json`` carries the provenance :meth:`RunDir.write_config` adds."""
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in _PROVENANCE_KEYS)


def _run_folder_entries(path: Path, own_names: Iterable[str]) -> Optional[List[str]]:
    """None when ``path`` may be used as a run folder, else the names that make it not one."""
    if not path.exists():
        return None
    if not path.is_dir():
        return [path.name]
    names = sorted(p.name for p in path.iterdir())
    ours = set(own_names)
    others = [n for n in names if not _is_housekeeping(n) and n not in ours]
    if not others:
        return None  # empty, or only lock/temp files and what this command writes itself
    present = set(names)
    config = path / RunDir.CONFIG
    if RunDir.CONFIG in present and (RunDir.LOG in present or _CHECKPOINT_NAME in present):
        return None
    if RunDir.CONFIG in present and _written_by_a_run(config):
        return None  # a run stopped before its first epoch
    return others


def check_run_folder(path: PathLike, own_names: Iterable[str] = ()) -> None:
    """Refuse (:class:`UsageError`, naming the folder and a few of its files) a ``--out``
    that exists and is not a run folder, leaving it untouched.

    A run folder is missing, empty, holds only the lock, temporary files of atomic writes
    and ``own_names`` (files or sub-folders the calling command writes itself), or holds
    ``config.json`` together with ``log.jsonl`` or ``checkpoint.pt``, or a ``config.json``
    carrying the provenance :meth:`RunDir.write_config` adds (a run stopped before its
    first epoch). Anything else is someone's folder: a run would mix its files into it."""
    path = Path(path)
    others = _run_folder_entries(path, own_names)
    if others is None:
        return
    if not path.is_dir():
        raise UsageError(f"{path} is a file, not a folder; choose another --out")
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    raise UsageError(f"{path} is not a run folder (it holds {shown}, but no config.json with "
                     f"log.jsonl or checkpoint.pt); choose an empty or new --out")


class RunDir:
    """The output folder of one run; writes only when ``is_main``."""

    CONFIG = "config.json"
    LOG = "log.jsonl"
    LOCK = LOCK_NAME
    _META_KEYS = _PROVENANCE_KEYS

    def __init__(self, path: PathLike, is_main: bool = True):
        self.path = Path(path)
        self.is_main = is_main
        self._lock_fd: Optional[int] = None
        self._made: List[Path] = []  # the folders this object created, the run folder first

    def is_run_folder(self, own_names: Iterable[str] = ()) -> bool:
        """Whether the folder may be used by a run (see :func:`check_run_folder`)."""
        return _run_folder_entries(self.path, own_names) is None

    def check_run_folder(self, own_names: Iterable[str] = ()) -> None:
        """:func:`check_run_folder` on this folder (every process may call it: it only reads)."""
        check_run_folder(self.path, own_names)

    @property
    def locked(self) -> bool:
        """Whether this object holds the folder's lock."""
        return self._lock_fd is not None

    def acquire_lock(self) -> bool:
        """Take the exclusive lock of the folder (main process only; creates the folder);
        True when this call took it, False on other ranks or when this object holds it.

        Raises :class:`RunLockedError` when another process (or another open of the lock
        file in this process) holds it."""
        import fcntl

        if not self.is_main or self._lock_fd is not None:
            return False
        self.create()
        lock_path = self.file(self.LOCK)
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunLockedError(f"{self.path} is in use by another run ({_lock_holder(lock_path)}); "
                                     f"wait for it or choose another --out") from None
            except BaseException:
                os.close(fd)
                raise
            # A holder removes the file while it still holds the lock when it finishes;
            # a lock taken on that removed file guards nothing, so open the new one.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            holder = {"pid": os.getpid(), "command_line": [sys.executable] + sys.argv,
                      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
            data = (json.dumps(holder) + "\n").encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        return True

    def release_lock(self) -> None:
        """Give the lock back and remove the lock file (no-op when not held); a folder this
        object created and that is left empty is removed too."""
        import fcntl

        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            try:
                if os.stat(self.file(self.LOCK)).st_ino == os.fstat(fd).st_ino:
                    os.unlink(self.file(self.LOCK))  # while still holding it: see acquire_lock
            except FileNotFoundError:
                pass  # discard() removed it with the folder
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        for folder in list(self._made):  # only when empty: a run that failed before writing anything
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                break
            self._made.remove(folder)

    @contextlib.contextmanager
    def lock(self) -> Iterator["RunDir"]:
        """``with run.lock():`` holds the folder's lock for the block (main process only)."""
        taken = self.acquire_lock()
        try:
            yield self
        finally:
            if taken:
                self.release_lock()

    def create(self) -> bool:
        """Create the folder (main process only); True when this object created it (here
        or when it took the lock)."""
        if not self.is_main:
            return False
        if not self.path.is_dir():
            missing = [self.path] + [p for p in self.path.parents if not p.exists()]
            self.path.mkdir(parents=True, exist_ok=True)
            self._made = [p for p in missing if p.is_dir()]
        return bool(self._made)

    def discard(self, names: Iterable[str] = ()) -> bool:
        """Remove a folder this run created and that holds nothing but run files
        (config.json, log.jsonl, ``names``, the lock file, leftovers of atomic writes); True
        when removed. Anything else in it (a user's file) keeps the folder."""
        if not self.is_main or not self.path.is_dir():
            return False
        ours = {self.CONFIG, self.LOG, *names}
        entries = list(self.path.iterdir())
        if any(not (p.is_file() and (p.name in ours or _is_housekeeping(p.name))) for p in entries):
            return False
        for p in entries:
            p.unlink()
        self.path.rmdir()
        return True

    def file(self, name: str) -> Path:
        """Path of ``name`` inside the run folder."""
        return self.path / name

    def write_config(self, config: Any) -> Path:
        """Write ``config`` (a dict or argparse Namespace) plus provenance to config.json."""
        if not isinstance(config, dict):
            config = vars(config)
        clash = [k for k in self._META_KEYS if k in config]
        if clash:
            raise ValueError(f"config keys {clash} are reserved for run provenance in "
                             f"{self.file(self.CONFIG)}")
        if self.is_main:
            record = dict(config)
            record["git_commit"] = git_commit()
            record["torch_version"] = torch.__version__
            record["command_line"] = [sys.executable] + sys.argv
            atomic_write_json(self.file(self.CONFIG), record)
        return self.file(self.CONFIG)

    def read_config(self) -> Dict[str, Any]:
        """The dict stored by :meth:`write_config` (provenance keys included)."""
        return self.read_json(self.CONFIG)

    def read_json(self, name: str) -> Any:
        path = self.file(name)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MissingFileError(f"{path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from exc

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` to ``name`` in the run folder atomically (strict JSON)."""
        if self.is_main:
            atomic_write_json(self.file(name), obj)
        return self.file(name)

    def log_epoch(self, record: Dict[str, Any]) -> None:
        """Append ``record`` as one JSON line to log.jsonl (flushed and fsynced)."""
        if not self.is_main:
            return
        line = json.dumps(to_jsonable(record), allow_nan=False)
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.file(self.LOG), "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_log(self) -> List[Dict[str, Any]]:
        """All records of log.jsonl (empty when it does not exist yet)."""
        path = self.file(self.LOG)
        if not path.exists():
            return []
        records = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {lineno} is not valid JSON: {exc}") from exc
        return records

    def write_log(self, records: Iterable[Dict[str, Any]]) -> None:
        """Replace log.jsonl by exactly ``records`` (atomically).

        A resumed run writes the epochs its checkpoint holds, so the log never repeats
        an epoch or keeps one that the checkpoint lost.
        """
        if not self.is_main:
            return
        text = "".join(json.dumps(to_jsonable(r), allow_nan=False) + "\n" for r in records)
        atomic_write_bytes(self.file(self.LOG), text.encode("utf-8"))

    def trim_log(self, before_epoch: int, key: str = "epoch") -> None:
        """Keep only records with ``record[key] < before_epoch``.

        A resumed run calls this with the epoch it restarts at, so epochs that were
        logged after the last checkpoint are not logged twice.
        """
        if not self.is_main or not self.file(self.LOG).exists():
            return
        self.write_log(r for r in self.read_log() if r.get(key, -1) < before_epoch)


def _lock_holder(lock_path: Path) -> str:
    """'pid N: command ...' from a held lock file (the holder writes it just after
    taking the lock, so an empty file is read again for a moment)."""
    holder = None
    for _ in range(20):
        try:
            holder = json.loads(lock_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            holder = None
        if isinstance(holder, dict):
            break
        time.sleep(0.05)
    if not isinstance(holder, dict):
        return "holder unknown"
    command = holder.get("command_line")
    if isinstance(command, list):
        command = " ".join(shlex.quote(str(c)) for c in command)
    command = str(command or "?")
    if len(command) > 200:
        command = command[:197] + "..."
    return f"pid {holder.get('pid', '?')}: command {command}"


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


def check_finite(loss: Any, step: int, epoch: Optional[int] = None) -> float:
    """Return ``loss`` as a float, or raise :class:`DivergedError` naming where it went bad.

    Reads the value on the host; training loops use the device-side guard of
    :mod:`common.engine` instead, which needs no synchronisation per step.
    """
    value = _number(loss)
    if not math.isfinite(value):
        raise DivergedError(non_finite_message(value, step, epoch))
    return value


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes (identifies a backbone or weight file wherever it lies)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
