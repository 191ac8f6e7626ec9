"""End-to-end runs of ``python -m decathlon.train`` and ``python -m decathlon.pretrain`` on a
generated decathlon tree: every method, kill-and-resume equality, two gloo processes under
torchrun, the non-finite-loss guard, and the backbone file staying byte-identical."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.errors import ResumeError
from common.masking import piggyback
from common.maskfile import load_masks, read_mask_file
from common.loaders import build_loader
from decathlon.data import DecathlonDataset, build_transforms
from common.amp import Precision
from common.classify import evaluate_classifier, predict
from common.errors import UsageError
from common.heads import reset_classifier
from common.methods import load_task
from decathlon.models import load_backbone, save_backbone
from decathlon.networks import create_model
from decathlon.synthetic import make_synthetic_decathlon
from decathlon.tasks import MASK_TASKS
from decathlon import train as train_mod

pytestmark = pytest.mark.slow  # end-to-end commands: left out of the fast subset

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID")
# masks flip within a few steps at this rate, so mask equality checks are meaningful
PIGGY = ["--task", "dtd", "--epochs", "3", "--batch-size", "6", "--lr", "1e-2",
         "--lr-steps", "2", "--workers", "0", "--print-freq", "100", "--device", "cpu"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_KEYS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def run(module, *args, env=None, ok=True, timeout=240):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{module} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    root = base / "decathlon-1.0"
    summary = make_synthetic_decathlon(root, num_classes={"dtd": 3}, train_per_class=6,
                                       val_per_class=2, test_per_class=1, seed=2)
    torch.manual_seed(0)
    model = create_model("wrn10_1", 1000)
    model.train()(torch.randn(8, 3, 64, 64))  # BN statistics that training must not touch
    save_backbone(base / "backbone.safetensors", model, "wrn10_1", val_top1=0.0)
    return {"base": base, "root": root, "backbone": base / "backbone.safetensors", "tasks": summary["tasks"],
            "backbone_sha": sha(base / "backbone.safetensors")}


@pytest.fixture(scope="module")
def piggy_run(world):
    """One uninterrupted piggyback run, data root given by the environment variable."""
    out = world["base"] / "piggy"
    proc = run("decathlon.train", *PIGGY, "--backbone", world["backbone"], "--out", out,
               env=_env(DECATHLON_ROOT=str(world["root"])))
    return out / "dtd", proc


def _mask_state(folder):
    masks, state, meta = read_mask_file(folder / "masks.safetensors")[:3]
    return masks, state, meta


def test_piggyback_run_folder_and_mask_file(world, piggy_run):
    folder, proc = piggy_run
    assert "eta" in proc.stdout and "ETA" in proc.stdout
    for name in ("config.json", "log.jsonl", "checkpoint.pt", "masks.safetensors", "metrics.json"):
        assert (folder / name).is_file(), name
    assert not (folder / "weights.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["data_root"] == str(world["root"]) and "git_commit" in config
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert [r["lr"]["main"] for r in log] == pytest.approx([1e-2, 1e-2, 1e-3])  # /10 after --lr-steps 2
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["task"] == "dtd" and metrics["method"] == "piggyback" and metrics["epochs"] == 3
    assert metrics["trainval"] is False and metrics["val_top1"] == log[-1]["val_top1"]
    assert 0.0 < metrics["sparsity"] < 1.0
    assert metrics["collapse"] is None and all("collapse" not in r for r in log)  # no false alarm
    assert sha(world["backbone"]) == world["backbone_sha"]

    # The mask file on the untouched backbone reproduces the reported validation top-1.
    backbone, _ = load_backbone(world["backbone"])
    reset_classifier(backbone, 47)
    model = piggyback(backbone, skip=("fc",))
    meta = load_masks(model, folder / "masks.safetensors")
    assert (meta["task"], meta["arch"], meta["method"]) == ("dtd", "wrn10_1", "piggyback")
    val = DecathlonDataset(world["root"], "dtd", "val", transform=build_transforms("dtd", False))
    loader = build_loader(val, batch_size=4, train=False, workers=0)
    result = evaluate_classifier(model, loader, Precision(torch.device("cpu")))
    assert result["val_top1"] == pytest.approx(metrics["val_top1"])
    predicted = predict(model, loader, prec=Precision(torch.device("cpu")))
    hits = (predicted == torch.tensor(val.targets)).float().mean().item()
    assert 100 * hits == pytest.approx(metrics["val_top1"])
    masks, _, _ = _mask_state(folder)
    zeros = sum(int((m == 0).sum()) for m in masks.values())
    assert zeros / sum(m.numel() for m in masks.values()) == pytest.approx(metrics["sparsity"])


def test_killed_run_resumes_to_the_same_mask(world, piggy_run):
    out = world["base"] / "killed"
    cmd = [sys.executable, "-m", "decathlon.train", *PIGGY, "--backbone", str(world["backbone"]),
           "--out", str(out), "--data-root", str(world["root"])]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt, deadline = out / "dtd" / "checkpoint.pt", time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert ckpt.exists() and not (out / "dtd" / "metrics.json").exists()  # really interrupted

    leftover = out / "dtd" / ".checkpoint.pt.abcd1234.tmp"  # what a kill during a write leaves
    leftover.write_bytes(b"partial")
    resumed = run("decathlon.train", *cmd[3:])
    assert "resumed from" in resumed.stdout
    assert not leftover.exists() and not list((out / "dtd").glob(".*.tmp"))
    ref_masks, ref_state, _ = _mask_state(piggy_run[0])
    masks, state, _ = _mask_state(out / "dtd")
    assert masks.keys() == ref_masks.keys() and all(torch.equal(masks[k], ref_masks[k]) for k in masks)
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    logs = [[json.loads(x)["train_loss"] for x in (f / "log.jsonl").read_text().splitlines()]
            for f in (piggy_run[0], out / "dtd")]
    assert logs[0] == logs[1]
    epochs = [json.loads(x)["epoch"] for x in (out / "dtd" / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # each epoch once, whatever the kill interrupted

    # Resuming with other settings is refused rather than mixed; so is a flag that
    # changes results but is in no hand-kept list (--hflip), and fewer epochs.
    for extra, message in ((["--lr", "5e-3"], "other settings.*lr"), (["--hflip", "on"], "other settings.*hflip"),
                           (["--epochs", "2"], "holds 3 epochs; --epochs 2 is fewer")):
        with pytest.raises(ResumeError, match=message):
            train_mod.main(train_mod.parse_config(cmd[3:] + extra))
    assert json.loads((out / "dtd" / "config.json").read_text())["lr"] == 1e-2  # left alone
    # What may change: workers, print frequency, more epochs (here: none left to run).
    again = run("decathlon.train", *cmd[3:], "--print-freq", "7", "--compile", "off")
    assert "resumed from" in again.stdout


def test_torchrun_two_gloo_processes_match_one_process(world, piggy_run):
    out = world["base"] / "ddp"
    args = [a if a != "6" else "3" for a in PIGGY]  # 2 processes x 3 = one batch of 6
    proc = run("torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "decathlon.train", *args, "--backbone", world["backbone"],
               "--out", out, "--data-root", world["root"])
    folder = out / "dtd"
    config = json.loads((folder / "config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["batch_size"] == 3
    log = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["val_count"] for r in log] == [6, 6, 6]  # sharded, reduced, never duplicated
    assert proc.stdout.count("done: val top-1") == 1  # only rank 0 reports
    ref_masks, ref_state, _ = _mask_state(piggy_run[0])
    masks, state, _ = _mask_state(folder)
    agree = sum(int((masks[k] == ref_masks[k]).sum()) for k in masks)
    assert agree / sum(m.numel() for m in masks.values()) > 0.999
    assert all(torch.allclose(state[k], ref_state[k], atol=1e-4) for k in ref_state)
    assert sha(world["backbone"]) == world["backbone_sha"]


@pytest.mark.parametrize("method,extra", [
    ("finetune", ["--trainval", "--lr", "1e-3"]),
    ("feature", ["--train-bn", "--amp", "on", "--channels-last", "on"]),
    ("scratch", ["--arch", "wrn10_1", "--hflip", "off", "--scale", "0.9", "1.1", "--cache-dir", "CACHE"]),
])
def test_baseline_methods_end_to_end(world, method, extra):
    out = world["base"] / method
    # a backbone path relative to the working directory is recorded absolute
    backbone = [] if method == "scratch" else ["--backbone", os.path.relpath(world["backbone"], REPO)]
    extra = [str(out / "cache") if a == "CACHE" else a for a in extra]
    run("decathlon.train", "--task", "svhn", "--method", method, "--epochs", "1",
        "--batch-size", "8", "--workers", "1", "--data-root", world["root"], "--out", out,
        "--print-freq", "100", "--device", "cpu", *backbone, *extra)
    folder = out / "svhn"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["sparsity"] is None
    assert metrics["result_file"] == "weights.safetensors" and "no mask" in metrics["note"]
    assert not (folder / "masks.safetensors").exists()
    model = create_model("wrn10_1", 10)
    meta = load_task(folder, model)
    assert meta["method"] == method and meta["num_classes"] == 10 and meta["file"].endswith("weights.safetensors")
    config = json.loads((folder / "config.json").read_text())
    if method != "scratch":
        assert config["backbone"] == meta["backbone"] == str(world["backbone"])
    sizes = world["tasks"]["svhn"]
    assert config["resolved"]["train_images"] == sizes["train"] + (sizes["val"] if "--trainval" in extra else 0)
    assert sha(world["backbone"]) == world["backbone_sha"]
    if "--cache-dir" in extra:  # every train and val image went through the decoded cache
        filled = sum(int((out / "cache" / f"svhn_svhn_{p}.filled").read_bytes().count(1)) for p in ("train", "val"))
        assert filled == sizes["train"] + sizes["val"]


def test_non_finite_loss_stops_naming_the_step(world):
    out = world["base"] / "nan"
    with pytest.raises(SystemExit) as stop:
        train_mod.cli(["--task", "svhn", "--method", "finetune", "--lr", "1e30", "--epochs", "2",
                       "--batch-size", "4", "--workers", "0", "--device", "cpu",
                       "--data-root", str(world["root"]), "--out", str(out),
                       "--backbone", str(world["backbone"])])
    assert re.search(r"non-finite loss .* at epoch 1 step [0-9]+", str(stop.value))
    assert not (out / "svhn").exists()  # failed before its first checkpoint: nothing left


def test_pretrain_then_train_all_tasks(world):
    # start from external weights (a DataParallel-style state dict) imported by key mapping
    source, _ = load_backbone(world["backbone"])
    external = world["base"] / "external.pt"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, external)
    external_sha = sha(external)
    pre = world["base"] / "pre"
    proc = run("decathlon.pretrain", "--arch", "wrn10_1", "--epochs", "1", "--batch-size", "8",
               "--workers", "0", "--device", "cpu", "--data-root", world["root"], "--out", pre,
               "--backbone", external, "--lr", "0.01")
    assert "imported external weights" in proc.stdout and sha(external) == external_sha
    metrics = json.loads((pre / "metrics.json").read_text())
    model, meta = load_backbone(pre / "backbone.safetensors")
    assert meta["arch"] == "wrn10_1" and meta["val_top1"] == metrics["val_top1"]
    assert model.fc.out_features == 1000 and (pre / "log.jsonl").is_file()
    moved = [k for k, v in source.state_dict().items() if not torch.equal(v, model.state_dict()[k])]
    assert any(k.endswith("conv1.weight") for k in moved)  # trained, starting from the import:
    w0, w1 = source.layer3[0].conv2.weight, model.layer3[0].conv2.weight
    assert ((w1 - w0).norm() / w0.norm()).item() < 0.3
    out = world["base"] / "all"
    run("decathlon.train", "--task", "all", "--epochs", "1", "--batch-size", "16",
        "--workers", "0", "--device", "cpu", "--data-root", world["root"], "--out", out,
        "--backbone", pre / "backbone.safetensors", "--scheme", "ternary")
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary) == sorted(MASK_TASKS)
    for task in MASK_TASKS:
        masks, _, meta = read_mask_file(out / task / "masks.safetensors")[:3]
        assert meta["task"] == task and meta["scheme"] == "ternary" and summary[task]["epochs"] == 1
    # --scheme affine: the scalars train with their own optimizer group and travel in the mask file
    affine = world["base"] / "affine"
    run("decathlon.train", "--task", "dtd", "--epochs", "1", "--batch-size", "16", "--workers", "0",
        "--device", "cpu", "--data-root", world["root"], "--out", affine, "--backbone", pre / "backbone.safetensors",
        "--scheme", "affine")
    contents = read_mask_file(affine / "dtd" / "masks.safetensors")
    assert contents.meta["scheme"] == "affine" and set(contents.extras) == set(contents.masks)
    start = (0.0, 1.0, 0.0, 0.0)  # rows a, b, c, d of each layer's one tensor
    assert all(set(layer) == {"abcd"} and layer["abcd"].shape[0] == 4 for layer in contents.extras.values())
    moved = {r for layer in contents.extras.values() for r in range(4)
             if float(layer["abcd"][r].flatten()[0]) != start[r]}
    assert moved == {0, 1, 2, 3}
    config = json.loads((affine / "dtd" / "config.json").read_text())
    assert config["scheme"] == "affine" and config["extras_optimizer"] == "adam" and config["extras_lr"] > 0


def test_recipe_gives_mask_defaults_and_explicit_flags_win():
    def resolved(*argv):
        return train_mod.parse_config(["--task", "dtd", "--backbone", "x.pt", *argv])

    paper = resolved("--recipe", "paper")
    assert (paper.mask_init, paper.mask_scale, paper.mask_spread, paper.threshold, paper.optimizer, paper.lr) == \
        ("constant", 1e-2, 0.0, 5e-3, "adam", 1e-4)
    default = resolved()
    assert default.recipe == "default" and default.mask_init == "spread" and default.mask_spread > 0
    mine = resolved("--recipe", "paper", "--mask-init", "uniform", "--mask-scale", "2e-3", "--threshold", "1e-3",
                    "--lr", "3e-4", "--optimizer", "sgd")
    assert (mine.mask_init, mine.mask_scale, mine.threshold, mine.lr, mine.optimizer) == \
        ("uniform", 2e-3, 1e-3, 3e-4, "sgd")
    finetune = resolved("--method", "finetune")
    assert finetune.mask_init is None and (finetune.optimizer, finetune.lr) == ("sgd", 1e-2)
    assert resolved("--compile", "on").compile == "on"


def test_bad_command_lines_are_refused(world, capsys):
    parser = train_mod.get_args_parser()

    def refused(*argv):
        with pytest.raises((SystemExit, UsageError)) as stop:
            train_mod.parse_config(list(argv))
        return str(stop.value) if stop.type is not SystemExit else capsys.readouterr().err

    assert "needs --backbone" in refused("--task", "dtd")
    assert "drop --backbone" in refused("--task", "dtd", "--method", "scratch", "--backbone", "x.pt")
    assert "--scheme only apply to --method piggyback" in refused("--task", "dtd", "--method", "finetune",
                                                                  "--backbone", "x.pt", "--scheme", "ternary")
    assert "--task 'mnist' is unknown" in refused("--task", "mnist", "--backbone", "x.pt")
    assert "only apply to --method piggyback" in refused("--task", "dtd", "--method", "finetune",
                                                         "--backbone", "x.pt", "--mask-init", "constant")
    assert "invalid choice" in refused("--task", "dtd", "--backbone", "x.pt", "--recipe", "other")
    help_text = parser.format_help()
    for flag in ("--data-root", "--arch", "--backbone", "--epochs", "--batch-size", "--out",
                 "--seed", "--workers", "--device", "--train-bn", "--scheme", "--config", "--threads", "--trainval",
                 "--head-lr", "--lr-steps", "--cache-dir", "--amp", "--channels-last", "--compile",
                 "--recipe", "--mask-spread"):
        assert flag in help_text
    with pytest.raises(SystemExit) as stop:
        train_mod.cli(["--task", "dtd", "--backbone", str(world["backbone"]), "--workers", "0",
                       "--data-root", str(world["base"] / "nowhere"), "--out", str(world["base"] / "x")])
    assert "nowhere" in str(stop.value) and "decathlon-1.0" in str(stop.value)
    assert not (world["base"] / "x").exists()  # a refused run leaves no folder


def test_device_loader_run_resumes_to_the_same_masks(world, tmp_path):
    """--loader device (batches augmented on the device, here the CPU) trains, writes the
    square-image cache once, and a run resumed after epoch 1 ends with the same masks, also
    when the resumed part keeps the images on the device (gathered there, no thread)."""
    args = [*PIGGY, "--backbone", world["backbone"], "--data-root", world["root"], "--loader", "device",
            "--cache-dir", tmp_path / "cache"]
    run("decathlon.train", *args, "--out", tmp_path / "full")
    run("decathlon.train", *[a if a != "3" else "1" for a in args], "--out", tmp_path / "cut")
    resumed = run("decathlon.train", *args, "--images-on-device", "on", "--out", tmp_path / "cut")
    assert "are kept on cpu" in resumed.stdout
    full, cut = _mask_state(tmp_path / "full" / "dtd"), _mask_state(tmp_path / "cut" / "dtd")
    assert all(torch.equal(full[0][k], cut[0][k]) for k in full[0])
    assert json.loads((tmp_path / "full" / "dtd" / "config.json").read_text())["loader"] == "device"
    assert len(list((tmp_path / "cache").glob("dtd_train_square72.u8"))) == 1
    bad = run("decathlon.train", *args, "--scale", "0.8", "1.2", "--out", tmp_path / "bad", ok=False)
    assert bad.returncode == 2 and "--loader device does not rescale" in bad.stderr
    bad = run("decathlon.train", *PIGGY, "--backbone", world["backbone"], "--data-root", world["root"],
              "--loader", "workers", "--images-on-device", "on", "--out", tmp_path / "bad", ok=False)
    assert bad.returncode == 2 and "--images-on-device on needs --loader device" in bad.stderr
