"""What users' own folders, images and keyboards do to a run, through the command line:
a folder of the user's is refused untouched, a second run into a folder in use is refused
naming the holder, bad datasets are refused before the first step (or unreadable images
left out when asked), Ctrl-C ends with one line and the same command resumes, and a
finished run run again changes nothing."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_image_tree, write_test_resnet_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    write_image_tree(base / "data")
    write_test_resnet_weights(base / "w.safetensors")
    return base


def _cmd(world, out, *extra):
    return [sys.executable, "-m", "classification.train", "--data-root", str(world / "data"), "--weights",
            str(world / "w.safetensors"), "--out", str(out), "--size", "16", "--eval-resize", "16",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--epochs", "1", *map(str, extra)]


def _run(cmd, ok=True):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if ok and proc.returncode != 0:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return proc


def _one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) <= 2, proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)


def test_a_users_folder_is_refused_untouched(world, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "config.json").write_text('{"mine": true}')
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    _one_line_error(_run(_cmd(world, mine), ok=False), "not a run folder", "notes.txt")
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before


def test_a_second_run_into_a_folder_in_use_is_refused(world, tmp_path):
    from common.runlog import RunDir
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from common.runlog import RunDir; "
                               f"RunDir({str(out)!r}).acquire_lock(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _run(_cmd(world, out), ok=False)
        _one_line_error(proc, "in use by another run", f"pid {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert RunDir(out).acquire_lock()  # the kernel released it with the process


@pytest.mark.slow
def test_bad_datasets_are_refused_before_the_first_step(world, tmp_path):
    data = write_image_tree(tmp_path / "empty")
    (data / "train" / "c").mkdir()
    (data / "test" / "c").mkdir()
    cmd = _cmd(world, tmp_path / "o1")
    cmd[cmd.index("--data-root") + 1] = str(data)
    _one_line_error(_run(cmd, ok=False), "c")
    _one_line_error(_run(_cmd(world, tmp_path / "o2", "--train-limit", "1"), ok=False), "--train-limit")
    corrupt = write_image_tree(tmp_path / "corrupt")
    (corrupt / "test" / "b" / "broken.png").write_bytes(b"not an image")
    cmd = _cmd(world, tmp_path / "o3")
    cmd[cmd.index("--data-root") + 1] = str(corrupt)
    _one_line_error(_run(cmd, ok=False), "broken.png", "--skip-unreadable")
    assert not (tmp_path / "o3").exists()
    _run(cmd + ["--skip-unreadable"])
    from common.config import read_run_config
    assert read_run_config(tmp_path / "o3")["unreadable"] == [str(corrupt / "test" / "b" / "broken.png")]


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_the_same_command_resumes(world, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(world, out, "--print-freq", "1")
    cmd[cmd.index("--epochs") + 1] = "40"
    # SIGINT as a terminal delivers it, even when the tests themselves run in the background
    # (where the shell starts them with SIGINT ignored, and a child would inherit that)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    # inside an epoch's steps or evaluation ("in epoch N ..."), or between its checkpoint and the next
    assert re.search(r"interrupted (in|after) epoch \d", err), err
    assert "re-run the same command to resume" in err and "checkpoint holds" in err
    cmd[cmd.index("--epochs") + 1] = "3"
    resumed = _run(cmd)
    assert "resumed from" in resumed.stdout and (out / "metrics.json").is_file()
    # a finished run run again changes nothing in its folder
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    again = _run(cmd)
    assert "already finished" in again.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()} == before


def test_an_out_that_cannot_be_created_ends_with_one_line_naming_it(world, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = _run(_cmd(world, blocker / "run"), ok=False)
    _one_line_error(proc, str(blocker), "cannot write or read")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("code, reason", [(28, "No space left on device"), (30, "Read-only file system"),
                                          (13, "Permission denied")])
def test_a_full_or_read_only_disk_ends_with_one_line(capsys, code, reason):
    import errno
    from common.cli import UsageExit, guarded
    assert errno.errorcode[code] in ("ENOSPC", "EROFS", "EACCES")

    def body():
        raise OSError(code, os.strerror(code), "/runs/x/.checkpoint.pt.tmp")

    with pytest.raises(UsageExit) as stop:
        guarded("prog", body)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == f"prog: error: cannot write or read /runs/x/.checkpoint.pt.tmp: {reason}\n"

    def defect():
        raise OSError(code, os.strerror(code))  # no file named: not a user's disk, a defect's traceback

    with pytest.raises(OSError):
        guarded("prog", defect)
