"""decathlon.submit and decathlon.accounting: predictions of every test image, validation,
the written files, the summary's score and parameter ratio, missing tasks."""
import copy
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.accounting import sparsity, task_cost
from common.checkpoint import save_checkpoint
from common.maskfile import save_masks
from common.masking import masked_modules, piggyback
from decathlon.accounting import decathlon_accounting, mask_file_cost
from decathlon.data import DecathlonDataset, build_transforms
from common.heads import reset_classifier
from common.methods import save_task
from decathlon.models import save_backbone
from decathlon.networks import create_model
from decathlon.score import load_results, load_test_labels, score_results
from decathlon.submit import SubmitConfig, main
from decathlon.submit import cli as submit_cli
from decathlon.synthetic import make_synthetic_decathlon
from decathlon.tasks import MASK_TASKS, TASK_NAMES, get_task

ROOT = Path(__file__).resolve().parents[1]
ARCH = "wrn10_1"
# One intra-op thread: the tiny network gains nothing from more, and they contend badly
# when other processes share the cores.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _task_model(backbone, task, seed, train_bn=False, scheme="binary"):
    model = copy.deepcopy(backbone)
    reset_classifier(model, get_task(task).num_classes)
    piggyback(model, skip=("fc",), train_bn=train_bn, scheme=scheme)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in masked_modules(model):  # about 30% of weights masked out
            layer.mask_real.copy_(torch.rand(layer.weight.shape, generator=g) * 0.014)
            for name in layer.scheme.extras:  # affine scalars away from their start
                getattr(layer, f"mask_{name}").add_(0.05 * torch.randn((), generator=g))
        for p in model.fc.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if train_bn:  # task-specific BN that differs from the backbone's
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                    m.weight.mul_(1.5)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A toy decathlon tree with labels, a backbone file and nine mask runs."""
    base = tmp_path_factory.mktemp("submit")
    data, labels, runs = base / "data", base / "labels", base / "runs"
    make_synthetic_decathlon(data, num_classes=2, train_per_class=1, val_per_class=1,
                             test_per_class=3, labels_dir=labels)
    torch.manual_seed(0)
    backbone = create_model(ARCH, 1000).eval()
    backbone_path = base / "backbone.safetensors"
    save_backbone(backbone_path, backbone, ARCH, val_top1=12.5)
    models = {}
    for k, task in enumerate(MASK_TASKS):
        train_bn = task == "dtd"  # one run with task-specific BN among plain ones
        scheme = "affine" if task == "svhn" else "binary"  # and one affine task
        model = _task_model(backbone, task, seed=k, train_bn=train_bn, scheme=scheme)
        save_masks(model, runs / task / "masks.safetensors", task=task, arch=ARCH,
                   num_classes=get_task(task).num_classes, val_top1=10.0 + 5 * k,
                   backbone=str(backbone_path))
        (runs / task / "metrics.json").write_text(json.dumps({"val_top1": 10.0 + 5 * k}))
        models[task] = model
    return {"data": data, "labels": labels, "runs": runs, "backbone": backbone,
            "backbone_path": backbone_path, "models": models, "base": base}


def _argv(s, out, *extra):
    return ["--runs", str(s["runs"]), "--data-root", str(s["data"]), "--out", str(out),
            "--workers", "0", "--device", "cpu", *extra]


def _run_main(argv):
    return main(SubmitConfig.from_cli(argv), log=lambda *a: None)


@torch.no_grad()
def _expected(model, data, task):
    ds = DecathlonDataset(data, task, "test", transform=build_transforms(task, False))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    spec = get_task(task)
    return {i: spec.category_id(int(c)) for i, c in zip(ds.image_ids, model(x).argmax(1))}


@pytest.mark.slow
def test_cli_end_to_end(setup, tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run([sys.executable, "-m", "decathlon.submit", *_argv(setup, out),
                           "--labels", str(setup["labels"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD_ENV)
    assert proc.returncode == 0, proc.stderr
    assert "parameter ratio" in proc.stdout
    pairs = load_results(out / "results.json")
    with zipfile.ZipFile(out / "results.zip") as zf:
        assert zf.namelist() == ["results.json"]
        assert zf.read("results.json") == (out / "results.json").read_bytes()
    # every test image of every task once; predictions are the masked models' argmax
    predicted = dict(pairs)
    assert len(predicted) == len(pairs) == 10 * 2 * 3
    assert {p // 10_000_000 for p in predicted} == set(range(1, 11))
    for task in ("svhn", "daimlerpedcls", "dtd"):
        expected = _expected(setup["models"][task], setup["data"], task)
        assert {i: predicted[i] for i in expected} == expected
    imagenet = _expected(setup["backbone"], setup["data"], "imagenet12")
    assert {i: predicted[i] for i in imagenet} == imagenet

    summary = json.loads((out / "summary.json").read_text())
    test = score_results(pairs, load_test_labels(str(setup["labels"])))
    assert summary["score_source"] == "test labels"
    assert summary["score"] == pytest.approx(test["score"])
    assert summary["val_score"] != summary["score"] or test["score"] == 0
    assert summary["missing_tasks"] == []
    for task in MASK_TASKS:
        entry = summary["tasks"][task]
        assert entry["status"] == "submitted" and entry["test_images"] == 6
        assert entry["test_top1"] == pytest.approx(test["top1"][task])
        assert entry["sparsity"] == pytest.approx(sparsity(setup["models"][task])["total"])
        assert entry["file_bytes"] == (setup["runs"] / task / "masks.safetensors").stat().st_size
    assert summary["tasks"]["imagenet12"]["val_top1"] == 12.5
    # #par from counts taken on the models themselves
    n = sum(p.numel() for p in setup["backbone"].parameters())
    costs = [task_cost(setup["models"][t]) for t in MASK_TASKS]
    expected_ratio = 1 + sum(c["mask_bits"] + 32 * c["extra_params"] for c in costs) / (32 * n)
    assert summary["parameter_ratio"] == pytest.approx(expected_ratio)
    assert summary["bytes"]["total_files"] == setup["backbone_path"].stat().st_size + sum(
        (setup["runs"] / t / "masks.safetensors").stat().st_size for t in MASK_TASKS)
    md = (out / "summary.md").read_text()
    assert all(f"| {t} |" in md for t in TASK_NAMES)


@pytest.mark.slow
def test_fold_and_multitask_modes_agree(setup, tmp_path):
    _run_main(_argv(setup, tmp_path / "a", "--mode", "multitask", "--backbone",
                    str(setup["backbone_path"])))
    summary = _run_main(_argv(setup, tmp_path / "b", "--mode", "fold"))
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    # without --labels the score is the validation estimate
    assert summary["score_source"].startswith("validation") and summary["test_score"] is None


@pytest.mark.slow
def test_compile_flag_compiles_each_task_once_with_the_same_predictions(setup, tmp_path, monkeypatch):
    """--compile on: every task's network is compiled once, after the graphs of the task
    before are dropped; the predictions are those of the plain run."""
    import decathlon.submit as submit
    asked = []
    monkeypatch.setattr(submit, "compile_for_eval", lambda model, choice, **kw: (asked.append(choice), model)[1])
    _run_main(_argv(setup, tmp_path / "plain"))
    _run_main(_argv(setup, tmp_path / "compiled", "--compile", "on"))
    assert asked == ["auto"] * len(TASK_NAMES) + ["on"] * len(TASK_NAMES)
    assert (tmp_path / "plain" / "results.json").read_bytes() == (tmp_path / "compiled" / "results.json").read_bytes()


def test_missing_task_refused_unless_allowed(setup, tmp_path):
    runs = tmp_path / "runs"
    for task in MASK_TASKS:
        if task not in ("gtsrb", "ucf101"):
            (runs / task).mkdir(parents=True)
            for f in ("masks.safetensors", "metrics.json"):
                (runs / task / f).write_bytes((setup["runs"] / task / f).read_bytes())
    argv = ["--runs", str(runs), "--data-root", str(setup["data"]), "--out", str(tmp_path / "o"),
            "--workers", "0", "--device", "cpu", "--backbone", str(setup["backbone_path"])]
    proc = subprocess.run([sys.executable, "-m", "decathlon.submit", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=ONE_THREAD_ENV)
    assert proc.returncode == 2 and "gtsrb, ucf101" in proc.stderr and "--allow-missing" in proc.stderr
    assert not (tmp_path / "o").exists()

    summary = _run_main(argv + ["--allow-missing", "--labels", str(setup["labels"])])
    assert summary["missing_tasks"] == ["gtsrb", "ucf101"]
    assert summary["tasks"]["gtsrb"]["status"] == "missing"
    assert summary["tasks"]["gtsrb"]["test_points"] == 0.0
    ids = {i for i, _ in load_results(tmp_path / "o" / "results.json")}
    assert not any(i // 10_000_000 == get_task("gtsrb").prefix // 10_000_000 for i in ids)
    assert len(ids) == 8 * 6
    assert summary["accounting"]["num_tasks_with_masks"] == 7


def test_wrong_task_file_and_stray_flags_refused(setup, tmp_path):
    runs = tmp_path / "runs"
    for task in MASK_TASKS:  # svhn's folder holds dtd's masks
        src = "dtd" if task == "svhn" else task
        (runs / task).mkdir(parents=True)
        (runs / task / "masks.safetensors").write_bytes((setup["runs"] / src / "masks.safetensors").read_bytes())
    with pytest.raises(ValueError, match="svhn"):
        _run_main(_argv(setup, tmp_path / "o") + ["--runs", str(runs)])
    with pytest.raises(SystemExit):  # a training flag: not a flag of this command
        _run_main(_argv(setup, tmp_path / "o", "--epochs", "3"))
    with pytest.raises(ValueError, match="wrn16_1"):  # --arch checks the backbone file's
        _run_main(_argv(setup, tmp_path / "o", "--arch", "wrn16_1"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("train_bn", [False, True])
def test_mask_file_cost_matches_model_counts(setup, tmp_path, train_bn):
    model = _task_model(setup["backbone"], "cifar100", seed=3, train_bn=train_bn)
    path = save_masks(model, tmp_path / "m.safetensors", task="cifar100")
    cost = mask_file_cost(path)
    reference = task_cost(model)
    assert cost["mask_bits"] == cost["masked_weights"] == reference["mask_bits"]
    assert cost["extra_params"] == reference["extra_params"]
    assert cost["head_params"] == model.fc.weight.numel() + model.fc.bias.numel()
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert cost["norm_params"] == (sum(2 * m.num_features for m in bn) if train_bn else 0)
    assert cost["other_params"] == 0
    assert cost["statistic_values"] == (sum(2 * m.num_features for m in bn) if train_bn else 0)
    assert cost["sparsity"] == pytest.approx(sparsity(model)["total"])
    assert cost["file_bytes"] == path.stat().st_size


def test_plain_nine_masks_give_paper_ratio():
    n = 5_846_480
    plain = decathlon_accounting(n, {t: {"mask_bits": n, "extra_params": 0} for t in MASK_TASKS})
    assert plain["parameter_ratio"] == pytest.approx(41 / 32) and round(plain["parameter_ratio"], 2) == 1.28
    assert plain["bytes"]["total_ideal"] == 4 * n + 9 * ((n + 7) // 8)
    with_heads = decathlon_accounting(n, {t: {"mask_bits": n, "extra_params": 257 * 10}
                                          for t in MASK_TASKS})
    assert with_heads["parameter_ratio"] == pytest.approx(41 / 32 + 9 * 2570 / n)
    assert with_heads["parameter_ratio_masks_only"] == pytest.approx(41 / 32)
    with pytest.raises(ValueError):
        decathlon_accounting(0, {})


# ------------------------------------------------------------------ what a new user hits

def _cli_error(capsys, argv) -> str:
    """Run ``decathlon.submit`` in-process as its command line does; the one-line error."""
    with pytest.raises(SystemExit) as stop:
        submit_cli(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("python -m decathlon.submit: error: ")
    return err


@pytest.fixture(scope="module")
def pretrain_run(setup):
    """A real decathlon.pretrain run folder: backbone.safetensors beside checkpoint.pt and JSON files."""
    from decathlon import pretrain
    out = setup["base"] / "pretrain"
    pretrain.main(pretrain.parse_config(["--arch", ARCH, "--epochs", "1", "--data-root", str(setup["data"]),
                                         "--out", str(out), "--batch-size", "4", "--workers", "0",
                                         "--device", "cpu", "--print-freq", "1000"]))
    assert (out / "backbone.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    return out


def _task_run_files(setup, folder: Path) -> dict:
    """A task run folder's other files: its training checkpoint (the keys decathlon.engine.fit
    writes), config.json, and a baseline's weights.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    model = setup["models"]["svhn"]
    save_checkpoint(folder / "checkpoint.pt", {
        "model": model.state_dict(), "epoch": 2, "rng": {}, "optimizers": [], "schedulers": [],
        "settings": {"task": "svhn", "method": "piggyback"}, "last": {}})
    (folder / "config.json").write_text(json.dumps({"task": "svhn", "backbone": str(setup["backbone_path"])}))
    save_task(folder, setup["backbone"], "finetune", arch=ARCH, num_classes=1000,
              task="svhn", backbone=str(setup["backbone_path"]))
    return {"checkpoint": folder / "checkpoint.pt", "weights": folder / "weights.safetensors",
            "config": folder / "config.json"}


def test_wrong_backbone_files_are_explained_in_one_line(setup, pretrain_run, tmp_path, capsys):
    pre, bb = pretrain_run, str(setup["backbone_path"])
    task = _task_run_files(setup, tmp_path / "runs" / "svhn")
    cases = [  # (what is passed as --backbone, what the message must say)
        (pre / "checkpoint.pt", ["resumable training checkpoint of decathlon.pretrain",
                                 f"pass {pre / 'backbone.safetensors'} instead"]),
        (setup["runs"] / "dtd" / "masks.safetensors", ["mask file of task 'dtd'", f"trained on, {bb}"]),
        (task["checkpoint"], ["training checkpoint of a decathlon.train run", "'svhn'", f"trained on, {bb}"]),
        (task["weights"], ["full weights of a --method finetune model", f"trained on, {bb}"]),
        (task["config"], ["JSON file", f"trained on, {bb}"]),
        (pre / "metrics.json", ["JSON file", f"pass {pre / 'backbone.safetensors'} instead"]),
        (pre, ["is a folder", f"pass the backbone file in it: {pre / 'backbone.safetensors'}"]),
        (setup["runs"], ["folder of decathlon.train task runs", f"trained on, {bb}"]),
        (pre / "backbone.pth", ["does not exist", f"did you mean {pre / 'backbone.safetensors'}?"]),
    ]
    out = tmp_path / "out"
    for given, expected in cases:
        err = _cli_error(capsys, _argv(setup, out, "--backbone", str(given)))
        assert str(given) in err and len(err) < 400, err
        for fragment in expected:
            assert fragment in err, (fragment, err)
        assert not out.exists()


def test_foreign_state_dict_reported_by_counts_not_every_key(setup, tmp_path, capsys):
    import torchvision
    foreign = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), foreign)
    err = _cli_error(capsys, _argv(setup, tmp_path / "out", "--backbone", str(foreign)))
    assert str(foreign) in err and "do not fit WideResNet" in err
    assert re.search(r"missing from the file: \d+ keys \[", err) and "more" in err
    assert err.count("'") <= 2 * 12 and len(err) < 900, err  # a few names, not all of them
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["decathlon.submit", "decathlon.train"])
def test_checkpoint_beside_backbone_as_run_by_a_user(setup, pretrain_run, tmp_path, command):
    out = tmp_path / "out"
    argv = ["--data-root", str(setup["data"]), "--out", str(out), "--workers", "0", "--device", "cpu",
            "--backbone", str(pretrain_run / "checkpoint.pt")]
    argv += ["--runs", str(setup["runs"])] if command == "decathlon.submit" else ["--task", "dtd"]
    proc = subprocess.run([sys.executable, "-m", command, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=ONE_THREAD_ENV)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 400, proc.stderr
    assert str(pretrain_run / "checkpoint.pt") in lines[0]
    assert f"pass {pretrain_run / 'backbone.safetensors'} instead" in lines[0]
    assert not out.exists()  # nothing left behind


def _partial_runs(setup, folder: Path, tasks) -> Path:
    for task in tasks:
        (folder / task).mkdir(parents=True)
        for f in ("masks.safetensors", "metrics.json"):
            (folder / task / f).write_bytes((setup["runs"] / task / f).read_bytes())
    return folder


def test_partial_submission_headline_is_the_test_score(setup, tmp_path):
    trained = ("dtd", "gtsrb", "svhn")
    runs = _partial_runs(setup, tmp_path / "runs", trained)
    argv = ["--runs", str(runs), "--data-root", str(setup["data"]), "--out", str(tmp_path / "o"),
            "--workers", "0", "--device", "cpu", "--backbone", str(setup["backbone_path"]),
            "--allow-missing", "--labels", str(setup["labels"])]
    summary = _run_main(argv)
    test = score_results(load_results(tmp_path / "o" / "results.json"), load_test_labels(str(setup["labels"])))
    assert summary["score"] == pytest.approx(test["score"]) == pytest.approx(summary["test_score"])
    assert summary["score_source"] == "test labels" and summary["val_score"] != summary["score"]
    missing = [t for t in MASK_TASKS if t not in trained]
    assert summary["complete"] is False and summary["missing_tasks"] == missing
    assert summary["submitted_tasks"] == ["dtd", "gtsrb", "imagenet12", "svhn"]
    assert summary["parameter_ratio_tasks"] == list(trained)
    assert "only" in summary["parameter_ratio_note"] and all(t in summary["parameter_ratio_note"] for t in missing)
    md = (tmp_path / "o" / "summary.md").read_text()
    head = md.split("| task |")[0]
    assert f"Partial submission: 6 of 10 tasks missing ({', '.join(missing)})" in head
    assert "#par covers only the submitted tasks" in head
    assert f"score: **{summary['score']:.1f}** / 10000 (from test labels)" in head
    assert f"validation estimate: {summary['val_score']:.1f}" in head and "not a test score" in head
    assert md.count("**missing**") == 6

    # labels for only some of the submitted tasks: the score says it is a lower bound
    only_dtd = tmp_path / "labels"
    only_dtd.mkdir()
    (only_dtd / "dtd_test.json").write_bytes((setup["labels"] / "dtd_test.json").read_bytes())
    with pytest.raises(ValueError, match="already holds a submission"):  # not replaced without a word
        _run_main(argv[:-1] + [str(only_dtd)])
    before = (tmp_path / "o" / "results.json").read_bytes()
    summary = _run_main(argv[:-1] + [str(only_dtd), "--overwrite"])
    assert (tmp_path / "o" / "results.json").read_bytes() == before  # same predictions, rescored
    assert summary["score_source"] == "test labels (lower bound: no labels for imagenet12, gtsrb, svhn, counted 0)"


def test_submission_pictures_linked_from_summary(setup, tmp_path):
    out = tmp_path / "sub"
    summary = _run_main(_argv(setup, out, "--labels", str(setup["labels"])))
    png = out / "tasks.png"
    assert png.is_file() and (png.stat().st_mode & 0o777) == 0o644
    with Image.open(png) as img:
        assert img.size[0] >= 800 and img.size[1] >= 500
    md = (out / "summary.md").read_text()
    links = re.findall(r"\]\(([^)]+\.png)\)", md)
    assert "tasks.png" in links
    for task in MASK_TASKS:  # the runs hold masks but no log.jsonl: sparsity only
        assert any(link.endswith(f"runs/{task}/sparsity.png") for link in links)
        assert (setup["runs"] / task / "sparsity.png").is_file()
        assert not (setup["runs"] / task / "curves.png").exists()
    assert all((out / link).resolve().is_file() for link in links), links
    assert summary["pictures"]["tasks"] == "tasks.png" and set(summary["pictures"]["runs"]) == set(MASK_TASKS)


def test_truncated_test_image_stops_the_submission(setup, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(setup["data"], data)
    first = json.loads((data / "annotations" / "dtd_test_stripped.json").read_text())["images"][0]
    jpeg = data / first["file_name"]
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 3])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "decathlon.submit", "--runs", str(setup["runs"]),
                           "--data-root", str(data), "--out", str(out), "--workers", "0",
                           "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ONE_THREAD_ENV)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert f"image file {jpeg} (image id {first['id']} of dtd_test_stripped.json) is truncated" in lines[0]
    assert not out.exists()
