"""The benchmark command runs end to end (its figures are measured, not tested here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import all_cores_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_command_writes_its_report(tmp_path):
    from benchmarks.harness import Section, render_markdown
    out = tmp_path / "B.md"
    # an earlier full report: --only storage replaces section 3 and keeps the others as they were
    sections = [Section("1. Training overhead", intro="old training figures"), Section("3. Storage"),
                Section("5. Memory", intro="old memory figures")]
    sections[0].check("old training row", "1.0", "<= 1.05", True)
    sections[1].check("OLD STORAGE ROW", "9", "1", False)
    sections[2].table("old memory table", ["a"], [["1"]])
    out.write_text(render_markdown(sections, {"cpu": "old"}, title="Benchmarks")
                   + "\n<!-- threads:begin -->\nthreads table\n<!-- threads:end -->\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--only", "storage", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=all_cores_env())
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert "## Machine" in text and "## 3. Storage" in text
    # bit-packed storage is exactly one bit per masked weight
    assert "1.0000 bit/weight" in text and "OLD STORAGE ROW" not in text
    assert text.startswith("# Benchmarks\n\nSection 3 written by `python -m benchmarks.run --quick --only storage`")
    for kept in ("| 1. Training overhead | old training row |", "old training figures", "old memory table",
                 "<!-- threads:begin -->\nthreads table\n<!-- threads:end -->"):
        assert text.count(kept) == 1, kept
    order = ["| 1. Training overhead |", "| 3. Storage |", "## 1. Training overhead", "## 3. Storage", "## 5. Memory",
             "<!-- threads:begin -->"]
    assert [text.index(k) for k in order] == sorted(text.index(k) for k in order)
    bad = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "nosuch"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nosuch" in bad.stderr


def test_benchmark_command_keeps_the_marked_sections(tmp_path):
    from benchmarks.run import keep_marked_sections
    from benchmarks.transfer import BEGIN, END
    old = tmp_path / "B.md"
    old.write_text(f"# Benchmarks\nold figures\n{BEGIN}\nreal-data table\n{END}\ntail\n"
                   "<!-- threads:begin -->\nthreads table\n<!-- threads:end -->\n")
    text = keep_marked_sections(old, "# Benchmarks\nnew figures\n")
    assert "new figures" in text and "old figures" not in text and "tail" not in text
    assert f"{BEGIN}\nreal-data table\n{END}" in text and "<!-- threads:begin -->\nthreads table\n" in text
    assert text.index(BEGIN) < text.index("threads:begin")
    assert keep_marked_sections(tmp_path / "absent.md", "x\n") == "x\n"


@pytest.mark.slow
def test_gpu_benchmark_end_to_end_path_runs_decathlon_train(tmp_path):
    """benchmarks.gpu's part B on the CPU (a code-path check; its rates mean nothing here):
    it writes a tree and a backbone, runs decathlon.train, and reads the rate from the run's
    log; a malformed run spec is refused with its text. Part C times evaluation."""
    out, tree = tmp_path / "G.md", tmp_path / "tree"
    env = all_cores_env(TMPDIR=str(tmp_path))  # a code-path check: no float sums compared
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--no-steps", "--out", str(out),
                           "--end-to-end", str(tree), "--e2e-images", "40", "--e2e-epochs", "1",
                           "--e2e-runs", "8:off:resident", "--eval", "--eval-batch", "4"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| piggyback, batch 8, eager, resident loader |"))
    rate, ms_per_step = float(row.split("|")[2].replace(",", "")), float(row.split("|")[4])
    assert rate > 0 and ms_per_step > 0 and "nine-task recipe projected, batch 32" not in text
    eager_eval = next(line for line in text.splitlines() if line.startswith("| eager |"))
    assert float(eager_eval.split("|")[3].replace(",", "")) > 0
    run = tmp_path / "piggyback-e2e" / "piggyback_batch_8_eager_resident_loader" / "svhn"
    written = tmp_path / "piggyback-e2e" / "backbone-wrn28_4-random.safetensors"
    config = json.loads((run / "config.json").read_text())
    assert (run / "log.jsonl").is_file() and config["backbone"] == str(written)
    assert (config["loader"], config["images_on_device"]) == ("device", "on")
    # --backbone: the runs train on the given file
    given = tmp_path / "given.pt"
    written.rename(given)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--no-steps", "--out", str(out),
                           "--end-to-end", str(tree), "--e2e-epochs", "1", "--e2e-runs", "8:off:device:finetune:bf16cl",
                           "--backbone", str(given)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "piggyback-e2e" / "finetune_batch_8_eager_device_loader_bf16cl" / "svhn"
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"] == str(given) and not written.exists() and config["images_on_device"] == "off"
    assert (config["amp"], config["channels_last"]) == ("on", "on")  # the PRECISION field
    for flags, named in ((["--e2e-runs", "128:fast:device"], "128:fast:device"),
                         (["--e2e-runs", "32:on:device:piggyback:fp16"], "32:on:device:piggyback:fp16"),
                         (["--eval-batch", "0"], "--eval-batch")):
        bad = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", *flags],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and named in bad.stderr
    missing = tmp_path / "no-backbone.pt"
    bad = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--no-steps", "--out", str(out),
                          "--end-to-end", str(tree), "--backbone", str(missing)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and str(missing) in bad.stderr


def test_gpu_benchmark_run_precisions_reach_decathlon_train_as_flags():
    """An end-to-end run's PRECISION: left out, decathlon.train's own defaults (no flag);
    fp32, cl and bf16cl name both switches, so a later change of the defaults does not
    change what they measure."""
    from benchmarks.gpu_decathlon import parse_run
    from decathlon.train import parse_config

    def switches(spec):
        label, flags = parse_run(spec)
        args = parse_config(["--task", "svhn", "--backbone", "x.pt", *flags])
        return label, args.amp, args.channels_last

    assert switches("32:cudagraphs:resident") == ("piggyback, batch 32, CUDA graphs, resident loader", "auto", "auto")
    assert switches("32:cudagraphs:resident:piggyback:fp32")[1:] == ("off", "off")
    assert switches("32:cudagraphs:resident:piggyback:cl") == (
        "piggyback, batch 32, CUDA graphs, resident loader, cl", "off", "on")
    assert switches("128:on:device:finetune:bf16cl")[1:] == ("on", "on")


def test_transfer_seeds_close_methods_and_renders_the_affine_and_sweep_tables():
    from benchmarks.transfer import METHODS, SWEEP, TASKS, close_pairs, close_variants, render, seed_mean

    def run(top1, sparsity=0.02, collapse=None):
        return {"top1": top1, "sparsity": sparsity, "collapse": collapse, "num_classes": 10, "train_images": 100,
                "eval_count": 50, "epochs": 1, "steps_per_epoch": 4, "step_time_s": 0.1, "train_time_s": 1.0}

    row = {"piggyback": run(97.0), "finetune": run(99.0), "affine": run(97.5)}
    assert close_pairs(row) == ["affine", "piggyback"]  # finetune is 1.5 points away
    assert close_pairs({"piggyback": run(90.0), "affine": run(97.5)}) == []
    row.update({"affine-seed1": run(97.9), "piggyback-seed1": run(96.0), "affine_lr1e-4": run(96.6),
                "affine-seed2": run(97.0), "piggyback-seed2": run(96.5), "piggyback-seed4": run(0.0),
                "affine_lr1e-2": run(10.0, 0.0, {"step": 88}), "affine_channel": run(97.7)})
    # seeds 0, 1, 2 (seed 4 without seed 3 is not part of the series)
    assert seed_mean(row, "affine") == pytest.approx(97.4667, abs=1e-4) and seed_mean(row, "finetune") == 99.0
    assert seed_mean(row, "piggyback") == pytest.approx(96.5)
    methods = [m for m in METHODS if m.key in ("piggyback", "finetune", "affine")]
    text = render({"digits": row}, tasks=[TASKS["digits"]], methods=methods, size=32, batch_size=32, threads=1,
                  total_s=1.0, quick=False, plot=None)
    assert ("| digits | 97.47 (97.50, 97.90, 97.00) | 96.50 (97.00, 96.00, 96.50) | 99.00 | +0.97 | -1.53 | 2.00 "
            "| **FAIL** |") in text
    row["finetune"] = run(97.4)
    text = render({"digits": row}, tasks=[TASKS["digits"]], methods=methods, size=32, batch_size=32, threads=1,
                  total_s=1.0, quick=False, plot=None)
    assert "| 97.40 | +0.97 | +0.07 | 2.00 | **PASS** |" in text
    sweep = next(line for line in text.splitlines() if line.startswith("| digits | 97.00 | "))
    # the default's cell is its seed mean; 1e-4 is within a point of it, 1e-2 is not
    assert "| 97.47 (97.50, 97.90, 97.00); sparsity 0.020 | 96.60; sparsity 0.020 |" in sweep
    assert "10.00: collapse reported at step 88; sparsity 0.000" in sweep
    assert len(SWEEP) == 4 and sweep.count("|") == 2 + 1 + len(SWEEP) + 1
    # 1e-4 and the per-channel values are within a point of the default, 1e-2 is not
    assert close_variants(row) == ["affine_lr1e-4", "affine_channel"]
    assert close_variants({"affine_lr1e-4": run(96.6)}) == []
    row["affine_lr1e-4-seed1"] = run(97.5)  # a rate's seeds enter its cell as the default's do
    text = render({"digits": row}, tasks=[TASKS["digits"]], methods=methods, size=32, batch_size=32, threads=1,
                  total_s=1.0, quick=False, plot=None)
    assert "| 97.05 (96.60, 97.50); sparsity 0.020 |" in text
    assert close_variants(row) == ["affine_lr1e-4", "affine_channel"]


def test_affine_forms_are_timed_against_binary_masks():
    from benchmarks.bench_training import AFFINE_FORMS, compare_affine_forms
    times = compare_affine_forms("mobilenet_v2", 0.03, repeats=2)
    assert list(times) == [label for label, _, _ in AFFINE_FORMS]
    assert all(len(v) == 2 and min(v) > 0 for v in times.values())
