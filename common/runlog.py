"""Run folders: what a run folder holds, who may write in it, and its lock.

A run folder holds ``config.json`` (the resolved configuration plus git commit, torch
version and command line), ``log.jsonl`` (one JSON object per epoch) and whatever JSON
results a pipeline writes. Only the main process writes; on other ranks every writing
method is a no-op, so training loops call them unconditionally. The folder itself is
created by the first write (or :meth:`RunDir.create`), never by the constructor, so a run
refused while it checks its settings leaves nothing behind. Files are written atomically
(:mod:`common.atomic`).

A run folder belongs to one run at a time: :meth:`RunDir.lock` takes an exclusive
``flock`` on ``OUT/.lock`` (creating the folder, since a run that takes the lock is about
to write there), records the holder's PID and command line in it, and refuses a second
process with :class:`RunLockedError` naming the holder. The kernel drops the lock when
the holding process dies, however it dies, so a run killed with SIGKILL never blocks
the next one. :func:`check_run_folder` refuses to write into a folder of the user's that
is not a run folder.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

import torch

from common.atomic import atomic_write_bytes, atomic_write_json, is_temp_file, to_jsonable
from common.errors import DataError, MissingFileError, RunLockedError, UsageError

__all__ = ["git_commit", "RunDir", "check_run_folder", "LOCK_NAME"]

PathLike = Union[str, os.PathLike]


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
_CHECKPOINT_NAME = "checkpoint.pt"  # common.resume.CHECKPOINT (which imports this module)
_PROVENANCE_KEYS = ("git_commit", "torch_version", "command_line")


def _is_housekeeping(name: str) -> bool:
    """The lock file and leftovers of atomic writes: present in any run folder."""
    return name == LOCK_NAME or is_temp_file(name)


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
