"""What a researcher meets beyond the first run, through the command lines: every documented
form of --weights, validation scored as validation and the test split once, runs that are
finished only when all their files are there, honest interrupts (Ctrl-C while a checkpoint
is written, SIGTERM, a full disk), data checked before the first step, a config.json edited
by hand, messages that name the cause, help that matches what a command accepts, and the
pictures' marks (chance, collapse, no mask, synthetic data)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_image_tree, write_test_resnet_weights

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _tree(root: Path, splits=("train", "val", "test")):
    return write_image_tree(root, splits)


def _run(module, *args, ok=True, env=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)
    if ok and proc.returncode != 0:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-3000:])
    return proc


def _one_line(proc, *words):
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and len(err) < 600, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("researcher")
    _tree(base / "data")
    write_test_resnet_weights(base / "w.safetensors")
    return base


def _train(world, out, *extra, data=None, ok=True):
    return _run("classification.train", "--data-root", data or world / "data", "--weights", world / "w.safetensors",
                "--out", out, "--size", "16", "--eval-resize", "16", "--batch-size", "4", "--workers", "0",
                "--device", "cpu", "--epochs", "1", *extra, ok=ok)


# ------------------------------------------------------------------ --weights, every form

@pytest.mark.slow
def test_every_documented_weights_form_trains_and_evaluates(world, tmp_path):
    import torchvision
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    name = Path(torchvision.models.get_model_weights("resnet18").DEFAULT.url).name
    torch.save(torchvision.models.resnet18().state_dict(), cache / name)
    env = {**ENV, "TORCH_HOME": str(tmp_path / "torch")}
    for i, form in enumerate(("imagenet", name, str(cache / name))):
        out = tmp_path / f"r{i}"
        _run("classification.train", "--arch", "resnet18", "--weights", form, "--data-root", world / "data", "--out",
             out, "--size", "32", "--eval-resize", "32", "--batch-size", "4", "--workers", "0", "--device", "cpu",
             "--epochs", "1", env=env)
        assert json.loads((out / "config.json").read_text())["resolved"]["backbone"] == str((cache / name).resolve())
        done = _run("classification.evaluate", out / "masks.safetensors", "--weights", form, "--data-root",
                    world / "data", "--device", "cpu", env=env)
        assert "test top-1" in done.stdout
    missing = _run("classification.train", "--arch", "resnet34", "--weights", "imagenet", "--data-root",
                   world / "data", "--out", tmp_path / "x", ok=False, env=env)
    _one_line(missing, "resnet34", "not in the cache")


# ------------------------------------------------------------------ validation and test

@pytest.mark.slow
def test_val_scores_the_epochs_and_test_is_scored_once(world, tmp_path):
    out = tmp_path / "vt"
    proc = _train(world, out, "--epochs", "2")
    assert "val loss" in proc.stdout and "test top-1" in proc.stdout and "scored once" in proc.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("val_top1" in r for r in log) and "test_top1" in log[-1] and "test_top1" not in log[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["test_count"] == 6 and "test_top1" in metrics
    only_test = _tree(tmp_path / "t", splits=("train", "test"))
    out = tmp_path / "t-run"
    proc = _train(world, out, data=only_test)
    assert "test loss" in proc.stdout and "val loss" not in proc.stdout
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert "test_top1" in record and "val_top1" not in record
    assert json.loads((out / "metrics.json").read_text())["split"] == "test"


# ------------------------------------------------------------------ finished runs

@pytest.mark.slow
def test_a_finished_run_writes_what_it_lacks_and_nothing_else(world, tmp_path, monkeypatch):
    out = tmp_path / "fin"
    cache = tmp_path / "cache"
    env = {**ENV, "PIGGYBACK_CACHE": str(cache)}
    args = ["--data-root", world / "data", "--weights", world / "w.safetensors", "--out", out, "--size", "16",
            "--eval-resize", "16", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--epochs", "1"]
    _run("classification.train", *args, env=env)
    assert list(cache.glob("image-scan/*.json")) and not list(out.glob(".image-scan*"))
    (out / "curves.png").unlink()
    (out / ".masks.safetensors.abc123.tmp").write_bytes(b"half a file")
    again = _run("classification.train", *args, env=env)
    assert "curves.png" in again.stdout and (out / "curves.png").is_file()
    assert not (out / ".masks.safetensors.abc123.tmp").exists()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
    third = _run("classification.train", *args, env=env)
    assert "unchanged" in third.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()} == before


# ------------------------------------------------------------------ interrupts and full disks

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


def _fit(tmp_path, epochs, **patches):
    from common.amp import Precision
    from common.classify import ClassificationPipeline
    from common.distributed import DistInfo
    from common.engine import FitState, fit
    from common.runlog import RunDir
    torch.manual_seed(0)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(2)]
    model = _Tiny()
    opt = {"main": torch.optim.SGD(model.parameters(), lr=0.1)}
    prec = Precision(torch.device("cpu"))
    return fit(RunDir(tmp_path / "run"), FitState(model, opt), ClassificationPipeline(prec, data, 2), data,
               epochs=epochs, config={"lr": 0.1}, dist=DistInfo(), set_epoch=lambda e: None, header="[svhn] ",
               log=lambda s: None)


def test_an_interrupt_while_a_checkpoint_is_written_names_the_epoch_it_holds(tmp_path, monkeypatch):
    import common.engine as engine
    real = engine.save_training_checkpoint

    def interrupted_on_epoch_2(path, **kw):
        if kw["epoch"] == 2:
            raise KeyboardInterrupt()
        return real(path, **kw)

    monkeypatch.setattr(engine, "save_training_checkpoint", interrupted_on_epoch_2)
    with pytest.raises(KeyboardInterrupt) as stop:
        _fit(tmp_path, 3)
    assert str(stop.value).startswith("[svhn] ") and "the checkpoint holds epoch 1" in str(stop.value)
    monkeypatch.undo()
    resumed = _fit(tmp_path, 3)
    assert resumed.start_epoch == 1


def test_a_full_disk_ends_with_the_file_its_size_and_what_is_intact(tmp_path, monkeypatch):
    import errno
    import common.atomic as atomic
    from common.errors import DiskFullError
    _fit(tmp_path, 1)
    real = atomic.os.fsync

    def full(fd):  # the disk fills up while the next checkpoint is written
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(DiskFullError) as stop:
        _fit(tmp_path, 2)
    message = str(stop.value)
    assert "checkpoint.pt" in message and re.search(r"\(\d+(\.\d)? (B|kB|MB)\)", message), message
    assert "the previous checkpoint.pt is intact" in message and "it holds epoch 1" in message
    monkeypatch.setattr(atomic.os, "fsync", real)
    assert _fit(tmp_path, 2).start_epoch == 1


def test_a_signal_whose_exception_python_dropped_still_ends_the_run(tmp_path):
    """Python drops an exception raised while it runs a fork callback or a finaliser; the
    signal is still noted, and the next step ends the run with it."""
    from common.cli import guarded
    from common.errors import Terminated, clear_termination, note_termination
    _fit(tmp_path, 1)
    note_termination("SIGHUP")  # the handler ran; its exception went nowhere
    try:
        with pytest.raises(Terminated, match="in epoch 2 at step 0 of 2; the checkpoint holds epoch 1") as stop:
            _fit(tmp_path, 3)
        assert stop.value.signal == "SIGHUP"
    finally:
        clear_termination()
    assert guarded("test", lambda: _fit(tmp_path, 2)) == 0  # nothing left over for the next command


def test_a_signal_nohup_ignores_stays_ignored():
    from common.cli import guarded
    seen = {}
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        guarded("test", lambda: seen.update(hup=signal.getsignal(signal.SIGHUP),
                                            term=signal.getsignal(signal.SIGTERM)))
        assert seen["hup"] is signal.SIG_IGN and callable(seen["term"])  # SIGTERM still ends a run
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_scheduler_signals_end_like_ctrl_c(world, tmp_path, sig):
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "classification.train", "--data-root", str(world / "data"), "--weights",
           str(world / "w.safetensors"), "--out", str(out), "--size", "16", "--eval-resize", "16", "--batch-size",
           "2", "--workers", "1", "--device", "cpu", "--epochs", "60", "--print-freq", "1"]
    # the command starts as from a terminal: a test run under nohup would hand it SIGHUP ignored
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(getattr(signal, sig), signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert len(err.strip().splitlines()) == 1 and f"stopped by {sig}" in err and "checkpoint holds epoch" in err, err
    from common.runlog import RunDir
    assert RunDir(out).acquire_lock()  # released
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert not children


# ------------------------------------------------------------------ data checked first

def test_data_problems_are_found_before_the_first_step(tmp_path):
    from decathlon.synthetic import make_synthetic_decathlon
    from decathlon.models import save_backbone
    from decathlon.networks import create_model
    root = tmp_path / "decathlon-1.0"
    make_synthetic_decathlon(root, tasks=("dtd",), num_classes={"dtd": 2}, train_per_class=2, val_per_class=1,
                             test_per_class=1)
    save_backbone(tmp_path / "bb.safetensors", create_model("wrn10_1", 1000), "wrn10_1")
    val = json.loads((root / "annotations" / "dtd_val.json").read_text())
    gone = root / val["images"][-1]["file_name"]
    gone.unlink()
    proc = _run("decathlon.train", "--task", "dtd", "--backbone", tmp_path / "bb.safetensors", "--data-root", root,
                "--out", tmp_path / "runs", "--workers", "0", "--device", "cpu", "--epochs", "1", ok=False)
    _one_line(proc, "missing", str(gone.relative_to(root)), "dtd_val.json")
    assert not (tmp_path / "runs").exists()


def test_an_rgb_voc_label_is_refused_before_training(tmp_path):
    from PIL import Image
    from segmentation.synthetic import write_synthetic_pascal
    layout = write_synthetic_pascal(tmp_path / "pascal", n_sbd_train=2, n_sbd_val=1, n_voc_train=2, n_voc_val=2,
                                    n_overlap=1, size=(20, 31), seed=1)
    label = sorted((layout.voc / "SegmentationClass").glob("*.png"))[0]
    Image.open(label).convert("RGB").save(label)
    proc = _run("segmentation.train", "--data-root", layout.root, "--split", "voc", "--random-init", "--arch",
                "vgg-tiny", "--out", tmp_path / "run", "--workers", "0", "--device", "cpu", ok=False)
    _one_line(proc, label.name, "'RGB'")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the user's configuration

@pytest.mark.slow
def test_an_edited_or_broken_config_json_is_refused(world, tmp_path):
    out = tmp_path / "cfg"
    _train(world, out)
    config = out / "config.json"
    original = config.read_text()
    edited = json.loads(original)
    edited["lr"] = 0.5
    config.write_text(json.dumps(edited))
    _one_line(_train(world, out, "--epochs", "2", ok=False), "edited", "lr", "0.5")
    assert json.loads(config.read_text())["lr"] == 0.5  # left as the user wrote it
    config.write_text("{broken")
    _one_line(_train(world, out, "--epochs", "2", ok=False), "not valid JSON", "config.json")
    config.write_text(original)
    _train(world, out, "--epochs", "2")


def test_config_files_take_flag_names_and_yaml_switches(world, tmp_path):
    pytest.importorskip("yaml")
    from classification.config import ClassificationConfig
    path = tmp_path / "c.yaml"
    path.write_text(f"weights: {world / 'w.safetensors'}\nhflip: off\nbatch-size: 7\n")
    cfg = ClassificationConfig.from_cli(["--config", str(path)])
    assert cfg.backbone == str(world / "w.safetensors") and cfg.hflip == "off" and cfg.batch_size == 7


# ------------------------------------------------------------------ messages

@pytest.mark.slow
def test_another_commands_run_folder_is_named_in_one_line(world, tmp_path):
    from decathlon.synthetic import make_synthetic_decathlon
    root = tmp_path / "decathlon-1.0"
    make_synthetic_decathlon(root, tasks=("dtd",), num_classes={"dtd": 2}, train_per_class=2, val_per_class=1,
                             test_per_class=1)
    _run("decathlon.train", "--task", "dtd", "--method", "scratch", "--arch", "wrn10_1", "--data-root", root,
         "--out", tmp_path / "dec", "--workers", "0", "--device", "cpu", "--epochs", "1")
    before = sorted(p.name for p in (tmp_path / "dec" / "dtd").iterdir())
    err = _one_line(_train(world, tmp_path / "dec" / "dtd", ok=False), "python -m decathlon.train", "'dtd'")
    assert len(err) < 300
    assert sorted(p.name for p in (tmp_path / "dec" / "dtd").iterdir()) == before


def test_files_of_other_types_are_counted(world, tmp_path):
    data = _tree(tmp_path / "gif", splits=("train", "test"))
    folder = data / "train" / "c"
    folder.mkdir()
    (data / "test" / "c").mkdir()
    for i in range(12):
        (folder / f"{i}.gif").write_bytes(b"GIF89a")
    (data / "train" / "a" / "x.gif").write_bytes(b"GIF89a")
    _one_line(_train(world, tmp_path / "o", data=data, ok=False), "12 .gif files", "readable: .jpg")


def test_score_names_test_images_without_a_prediction(tmp_path):
    from decathlon.synthetic import make_synthetic_decathlon
    summary = make_synthetic_decathlon(tmp_path / "d", tasks=("dtd",), num_classes={"dtd": 2}, train_per_class=1,
                                       val_per_class=1, test_per_class=12, labels_dir=tmp_path / "labels")
    ids = summary["tasks"]["dtd"]["test_ids"]
    results = [{"image_id": i, "category_id": 40000001} for i in ids[4:]]
    (tmp_path / "r.json").write_text(json.dumps(results))
    proc = _run("decathlon.score", "--results", tmp_path / "r.json", "--labels", tmp_path / "labels")
    assert "4 labelled test image(s) have no prediction" in proc.stderr and "dtd 4" in proc.stderr


# ------------------------------------------------------------------ help and docs

COMMANDS = ["decathlon.train", "decathlon.pretrain", "decathlon.submit", "decathlon.score", "decathlon.demo",
            "decathlon.import_backbone", "classification.train", "classification.evaluate", "classification.realdata",
            "classification.import_masks", "segmentation.train", "segmentation.evaluate", "segmentation.demo",
            "benchmarks.run", "benchmarks.gpu", "benchmarks.transfer"]


def _settings(module):
    import importlib
    from common.settings import Settings
    mod = importlib.import_module(module)
    found = [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, Settings) and v.PROG
             and v.PROG.endswith(module)]
    assert len(found) == 1, (module, found)
    return found[0]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_matches_what_the_command_accepts(module):
    import dataclasses
    from common.settings import _choices
    cls = _settings(module)
    parser = cls.parser()
    actions = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(cls):
        if not f.metadata["cli"]:
            continue
        action = actions[f.name]
        choices = _choices(f)
        if choices:
            assert list(action.choices) == list(choices), (module, f.name)
        assert action.help and len(action.help) <= 200 and "(default: " in action.help, (module, f.name)
    if module == "segmentation.train":
        assert list(actions["method"].choices) == ["piggyback", "finetune"]
        assert "(default: fixed)" not in actions["learn_upsample"].help


def _help_entries(text):
    """[(invocation, [help lines])] of an argparse help text."""
    entries = []
    for line in text.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            found = re.match(r"  (\S.*?)(?:\s{2,}(\S.*))?$", line)
            entries.append((found.group(1), [found.group(2)] if found.group(2) else []))
        elif line.startswith("   ") and entries and line.strip():
            entries[-1][1].append(line.strip())
        else:
            entries.append(("", []))  # a blank line or a heading ends the entry
    return [e for e in entries if e[0]]


@pytest.mark.parametrize("module", COMMANDS)
def test_each_help_entry_is_at_most_two_lines_with_its_default(module, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    parser = _settings(module).parser()
    text = parser.format_help()
    parser.epilog = None  # the epilog's lines are not entries
    entries = [e for e in _help_entries(parser.format_help()) if not e[0].startswith("-h, --help")]
    assert entries
    for invocation, lines in entries:
        if invocation.startswith(("--", "-")) or lines:
            assert 1 <= len(lines) <= 2, (module, invocation, lines)
            assert "(default: " in " ".join(lines), (module, invocation)
            assert all(len(line) <= 80 for line in lines), (module, invocation)
    usage, rest = text.split("\n\n", 1)
    assert all(len(line) <= 80 for line in rest.splitlines() if not line.startswith("  -")), module


def test_readme_commands_use_flags_their_commands_have():
    text = "\n".join((ROOT / name).read_text() for name in ("README.md", "classification/README.md",
                                                            "segmentation/README.md"))
    text = text.replace("\\\n", " ")
    checked = 0
    for line in text.splitlines():
        found = re.search(r"python -m ([\w.]+)(.*)", line)
        if not found or found.group(1) not in COMMANDS:
            continue
        flags = {a for action in _settings(found.group(1)).parser()._actions for a in action.option_strings}
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", found.group(2).split("#")[0].split("`")[0]):
            assert flag in flags, (found.group(1), flag, line)
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_takes_its_settings_back_from_config(module, tmp_path):
    cls = _settings(module)
    values = {"decathlon.train": {"task": "svhn", "backbone": "b.pt"}, "decathlon.pretrain": {},
              "decathlon.submit": {"runs": "runs"}, "decathlon.score": {"accuracies": "a.json"},
              "decathlon.import_backbone": {"file": "imnet.t7", "out": "b.safetensors"},
              "classification.train": {"backbone": "w.pth", "arch": "resnet18"},
              "classification.evaluate": {"target": "run"}, "classification.import_masks":
              {"file": "m.pt", "arch": "resnet50", "weights": "w.pth", "out": "masks"},
              "segmentation.evaluate": {"run_dir": "run"}, "segmentation.demo": {"out": str(tmp_path / "d")},
              "benchmarks.gpu": {"device": "cpu"}}.get(module, {})
    first = cls.build(("test", values))
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(first.as_dict()))
    again = cls.from_cli(["--config", str(path)])
    assert again.as_dict() == first.as_dict()


# ------------------------------------------------------------------ pictures

def test_curves_mark_chance_and_collapse_and_an_empty_mask_says_so():
    from common.plots import curves_figure, sparsity_figure
    records = [{"epoch": 1, "train_loss": 1.0, "train_top1": 60.0, "val_top1": 55.0},
               {"epoch": 2, "train_loss": 3.0, "train_top1": 11.0, "val_top1": 10.0, "collapse": {"step": 17}}]
    fig = curves_figure(records, chance=10.0)
    labels = [line.get_label() for ax in fig.axes for line in ax.get_lines()]
    assert "chance (10%)" in labels and "collapse (step 17)" in labels
    fig = sparsity_figure({"conv1": 0.0, "fc": 0.0})
    assert any("no weight is masked out" in t.get_text() for t in fig.axes[0].texts)


def test_synthetic_overview_pictures_carry_the_badge(tmp_path):
    from PIL import Image
    from segmentation.palette import save_overview
    image = np.zeros((40, 50, 3), dtype=np.uint8)
    labels = np.zeros((40, 50), dtype=np.uint8)
    plain = Image.open(save_overview(image, labels, tmp_path / "a.png", target=labels))
    marked = Image.open(save_overview(image, labels, tmp_path / "b.png", target=labels, synthetic=True))
    assert marked.height > plain.height and marked.width == plain.width
