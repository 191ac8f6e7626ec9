"""common.runlog: a run folder is locked by one run; a user's folder is refused untouched."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import RunLockedError, UsageError
from common.runlog import LOCK_NAME, RunDir, check_run_folder

ROOT = Path(__file__).resolve().parents[1]


def test_two_opens_in_one_process_conflict(tmp_path):
    out = tmp_path / "run"
    first, second = RunDir(out), RunDir(out)
    with first.lock():
        assert first.locked and (out / LOCK_NAME).is_file()
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command_line"]
        with pytest.raises(RunLockedError) as err:
            second.acquire_lock()
        message = str(err.value)
        assert isinstance(err.value, UsageError) and "\n" not in message
        assert message.startswith(f"{out} is in use by another run (pid {os.getpid()}: command ")
        assert message.endswith("wait for it or choose another --out")
        assert not second.locked
    assert not first.locked and not (out / LOCK_NAME).exists()
    with second.lock():  # free again once released
        assert second.locked
    assert not out.exists()  # a folder the lock created and nothing was written into is removed
    out.mkdir()
    (out / "config.json").write_text("{}")
    with first.lock():
        pass
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # a folder it did not create stays


def test_other_ranks_do_not_lock(tmp_path):
    out = tmp_path / "run"
    with RunDir(out, is_main=False).lock() as run:
        assert not run.locked and not out.exists()
        with RunDir(out).lock():
            pass


def test_discard_removes_a_folder_holding_only_run_files_and_the_lock(tmp_path):
    out = tmp_path / "run"
    run = RunDir(out)
    with run.lock():
        run.write_config({"lr": 0.1})
        assert run.discard()
        assert not out.exists()
    kept = RunDir(tmp_path / "kept")
    with kept.lock():
        (kept.path / "notes.txt").write_text("mine")
        assert not kept.discard()
    assert sorted(p.name for p in kept.path.iterdir()) == ["notes.txt"]


_HOLDER = """
import sys, time
from common.runlog import RunDir
run = RunDir(sys.argv[1])
run.acquire_lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_live_holder_is_named_and_a_killed_one_frees_the_lock(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), "--marker-arg"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as err:
            RunDir(out).acquire_lock()
        message = str(err.value)
        assert f"pid {proc.pid}: command " in message and "--marker-arg" in message
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (out / LOCK_NAME).exists()  # left behind by the killed run, but not held
    run = RunDir(out)
    assert run.acquire_lock()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    run.release_lock()


def test_users_folder_is_refused_and_left_unchanged(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("results of last week")
    (mine / "config.json").write_text('{"my": "settings"}')
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in mine.iterdir()}
    with pytest.raises(UsageError) as err:
        check_run_folder(mine)
    message = str(err.value)
    assert str(mine) in message and "notes.txt" in message and "not a run folder" in message
    assert "\n" not in message
    assert not RunDir(mine).is_run_folder()
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in mine.iterdir()} == before
    stray = tmp_path / "file"
    stray.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_run_folder(stray)


def test_run_folders_are_accepted(tmp_path):
    check_run_folder(tmp_path / "new")  # missing
    empty = tmp_path / "empty"
    empty.mkdir()
    check_run_folder(empty)
    (empty / LOCK_NAME).write_text("")
    (empty / ".config.json.abc123.tmp").write_text("")
    check_run_folder(empty)  # lock and temporary files only
    for extra in ("log.jsonl", "checkpoint.pt"):
        folder = tmp_path / extra
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / extra).write_text("")
        (folder / "notes.txt").write_text("a note beside a run")
        check_run_folder(folder)
    started = RunDir(tmp_path / "started")
    started.write_config({"lr": 0.1})  # stopped before its first epoch
    assert started.is_run_folder()
    tasks = tmp_path / "tasks"
    (tasks / "svhn").mkdir(parents=True)
    with pytest.raises(UsageError):
        check_run_folder(tasks)
    check_run_folder(tasks, own_names=("svhn", "dtd"))
