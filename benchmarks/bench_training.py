"""Benchmark 1: a piggyback training step against a finetuning step of the same network.

Both contenders start from the same weights, see the same batch, use the same optimiser
type and the same batch-norm mode, and are timed in alternating rounds in one process.
The phase table (forward / backward / optimiser) and the kernel table (the masking work
alone, written several ways) say where any difference comes from; the forms table times the
affine scheme's two ways of writing W' against binary masks on masks partly switched off.
"""
from __future__ import annotations

import gc
import time
from typing import Dict, List
from unittest import mock

import torch

from benchmarks.harness import Section, fmt, median, median_ratio, time_side_by_side
from benchmarks.workloads import (get_workload, bench_optimizer, masking_kernels, prepare, prepare_scheme,
                                 scheme_optimizers, set_random_masks, timed_step)

GOAL = 1.05

# (workload, optimiser, train_bn, rounds); the quick run keeps the two required rows
CASES_FULL = [("wrn28_4", "adam", False, 15), ("wrn28_4", "adam", True, 7), ("wrn28_4", "sgd", False, 7),
              ("fcn32s", "adam", False, 3)]
CASES_QUICK = [("wrn28_4", "adam", False, 5), ("fcn32s", "adam", False, 2)]
# scheme against binary piggyback: (workload, scheme, rounds, compiled); compiled pairs
# compile both models first (about a minute each for MobileNetV2 on two cores). A
# MobileNetV2 step at 32 px takes about 0.15 s: many rounds are cheap there, and a
# ratio from 7 rounds moved by 0.05 between two runs of the same code.
SCHEME_CASES_FULL = [("wrn28_4", "affine", 15, False), ("wrn28_4", "affine-channel", 7, False),
                     ("mobilenet_v2", "affine", 41, False), ("mobilenet_v2", "affine", 41, True)]
SCHEME_CASES_QUICK = [("wrn28_4", "affine", 5, False), ("mobilenet_v2", "affine", 5, False)]
# the affine forms table: (workload, fractions of mask entries off, rounds); trained masks of
# the transfer benchmark have 2-3 % of their entries off
FORMS_FULL = ("mobilenet_v2", (0.0, 0.03, 0.3), 21)
FORMS_QUICK = ("mobilenet_v2", (0.03,), 5)
# (label, scheme, CPU eager form): binary masks, then affine in each of its two forms
AFFINE_FORMS = (("binary: one select", "binary", False),
                ("affine: select of two multiply-adds (GPU, compiled)", "affine", False),
                ("affine: products with a float mask (CPU eager)", "affine", True))


def compare_affine_forms(workload_name: str, zero_fraction: float, repeats: int) -> Dict[str, List[float]]:
    """Seconds for the masked weights of every masked layer, forward and backward (eq. 7 and
    the scalars' gradients), with about ``zero_fraction`` of the mask entries off: binary
    masks, and ``affine`` in each of its two forms (``common.kernels.cpu_eager`` chooses
    the form; here it is held at one, then the other)."""
    import common.kernels
    from common.masking import mask_entries
    workload = get_workload(workload_name)
    torch.manual_seed(0)
    plain = workload.build()
    fns = {}
    for label, scheme, cpu_form in AFFINE_FORMS:
        model, _ = prepare_scheme(plain, workload, scheme)
        set_random_masks(model, zero_fraction, scheme=scheme)
        entries = mask_entries(model)
        grads = [torch.randn_like(e.weight) for e in entries]

        def masked_weights(entries=entries, grads=grads, cpu_form=cpu_form):
            with mock.patch.object(common.kernels, "cpu_eager", lambda *tensors: cpu_form):
                for e, g in zip(entries, grads):
                    out = e.module.scheme.masked_weight(e.weight, e.mask_real, e.module.threshold,
                                                        list(e.extras.values()))
                    out.backward(g.clone())  # a fresh incoming gradient, as a layer's backward hands on

        fns[label] = masked_weights
    times = time_side_by_side(fns, repeats=repeats, warmup=2)
    del fns, plain
    gc.collect()
    return times


def compare_schemes(workload_name: str, scheme: str, repeats: int, warmup: int = 1, compiled: bool = False) -> Dict:
    """Seconds per step of piggyback with ``scheme`` and with binary masks, side by side,
    each with the optimisers a training command builds (``common.optimizers.build_optimizers``:
    Adam for the masks and for the head, and the scheme's own optimiser for its values).
    With ``compiled``, both models run under ``torch.compile`` (the optimisers eager, as in
    the training commands), compiled and warmed up before the timed rounds."""
    workload = get_workload(workload_name)
    torch.manual_seed(0)
    plain = workload.build()
    x, y = workload.batch(workload.batch_size)
    steps, phases = {}, {}
    if compiled:
        torch.compiler.reset()
        warmup = max(warmup, 3)  # compile, then two steps for the allocator
    for name in ("binary", scheme):
        model, prepared = prepare_scheme(plain, workload, name)
        opts = scheme_optimizers(prepared, name)
        record: List = []
        phases[name] = record

        fwd = torch.compile(model) if compiled else model

        def step(model=fwd, opts=opts, record=record):
            record.append(timed_step(model, opts, x, y, workload.loss))

        steps[name] = step
    if compiled:
        for step in steps.values():  # compile each before the timed rounds
            step()
    times = time_side_by_side(steps, repeats=repeats, warmup=warmup)
    del steps, plain
    gc.collect()
    return {"times": times, "workload": workload,
            "phases": {k: [median([p[i] for p in rec[-repeats:]]) for i in range(3)] for k, rec in phases.items()}}


def compare(workload_name: str, optimizer: str, train_bn: bool, repeats: int, warmup: int = 1) -> Dict:
    """Seconds per step (and per phase) of piggyback and finetune, side by side."""
    workload = get_workload(workload_name)
    torch.manual_seed(0)
    plain = workload.build()
    x, y = workload.batch(workload.batch_size)
    steps, phases, models = {}, {}, {}
    for method in ("piggyback", "finetune"):
        # the last contender takes the plain model itself: one copy fewer of VGG-16
        model, params = prepare(plain, method, workload, train_bn=train_bn,
                                copy_model=method != "finetune")
        opt = bench_optimizer(optimizer, params)
        record: List = []
        phases[method], models[method] = record, model

        def step(model=model, opt=opt, record=record):
            record.append(timed_step(model, opt, x, y, workload.loss))

        steps[method] = step
    del plain
    times = time_side_by_side(steps, repeats=repeats, warmup=warmup)
    kernels = time_side_by_side(masking_kernels(models["piggyback"]), repeats=max(3, repeats // 2), warmup=1)
    out = {"times": times, "kernels": {k: median(v) for k, v in kernels.items()}, "workload": workload,
           "phases": {m: [median([p[i] for p in rec[warmup:]]) for i in range(3)]
                      for m, rec in phases.items()}}
    del models, steps
    gc.collect()
    return out


def run(quick: bool, context: dict) -> Section:
    start = time.perf_counter()
    section = Section(
        "1. Training overhead",
        "A piggyback training step (forward, backward, optimiser step) against a finetuning "
        "step of the same network: same initial weights, same batch, same optimiser type, same "
        "batch-norm mode (frozen: running statistics; trained: batch statistics). Piggyback "
        "optimises the real-valued masks (plus the new head), finetuning every weight. Times "
        "are medians over alternating rounds; the ratio is the median of the per-round ratios.")
    rows, phase_rows, kernel_rows, phase_times = [], [], {}, {}
    for name, optimizer, train_bn, repeats in (CASES_QUICK if quick else CASES_FULL):
        r = compare(name, optimizer, train_bn, repeats)
        t = r["times"]
        ratio = median_ratio(t["piggyback"], t["finetune"])
        bn = "n/a (no BN)" if not r["workload"].has_bn else ("trained" if train_bn else "frozen")
        rows.append([r["workload"].label, optimizer, bn, fmt(1e3 * median(t["piggyback"])),
                     fmt(1e3 * median(t["finetune"])), f"{ratio:.3f}", str(repeats)])
        section.check(f"piggyback / finetune step, {name}, {optimizer}, BN {bn}", f"{ratio:.3f}",
                      f"<= {GOAL}", ratio <= GOAL)
        for method in ("piggyback", "finetune"):
            fwd, bwd, opt = r["phases"][method]
            phase_rows.append([name, optimizer, bn, method, fmt(1e3 * fwd), fmt(1e3 * bwd), fmt(1e3 * opt)])
            phase_times.setdefault((name, method), r["phases"][method])
        for kernel, seconds in r["kernels"].items():
            kernel_rows.setdefault((name, kernel), []).append(seconds)
        if name == "wrn28_4" and not train_bn and optimizer == "adam":
            context["wrn_train_images_per_s"] = r["workload"].batch_size / median(t["piggyback"])
    section.table("", ["workload", "optimiser", "BN", "piggyback ms/step", "finetune ms/step",
                       "ratio", "rounds"], rows)
    section.table("Where the time goes (medians, ms):",
                  ["workload", "optimiser", "BN", "method", "forward", "backward", "optimiser step"],
                  phase_rows)
    section.table("The elementwise work masking adds to a step, over all masked layers, written "
                  "several ways (median ms; the training path of `common.masking` is stateless: one "
                  "select into a new tensor for eq. 4, one product into a new tensor for eq. 7):",
                  ["workload", "kernel", "ms per step"],
                  [[name, kernel, fmt(1e3 * median(v))] for (name, kernel), v in kernel_rows.items()])
    scheme_rows = []
    for name, scheme, repeats, compiled in (SCHEME_CASES_QUICK if quick else SCHEME_CASES_FULL):
        r = compare_schemes(name, scheme, repeats, compiled=compiled)
        t, ph = r["times"], r["phases"]
        ratio = median_ratio(t[scheme], t["binary"])
        mode = "compiled" if compiled else "eager"
        scheme_rows.append([get_workload(name).label, scheme, mode, fmt(1e3 * median(t[scheme])),
                            fmt(1e3 * median(t["binary"])), f"{ratio:.3f}", str(repeats)]
                           + [f"{1e3 * (ph[scheme][i] - ph['binary'][i]):+.1f}" for i in range(3)])
        section.check(f"{scheme} / binary piggyback step, {name}, {mode}, adam", f"{ratio:.3f}", f"<= {GOAL}",
                      ratio <= GOAL)
    section.table("Mask schemes with values beside the mask against the binary mask (BN frozen; each with "
                  "the optimisers the training commands build: Adam for masks and head, the scheme's "
                  "optimiser for its values), and where the difference goes (median ms of each phase):",
                  ["workload", "scheme", "mode", "scheme ms/step", "binary ms/step", "ratio", "rounds",
                   "forward +ms", "backward +ms", "optimiser +ms"], scheme_rows)
    name, fractions, repeats = FORMS_QUICK if quick else FORMS_FULL
    form_rows = []
    for fraction in fractions:
        t = compare_affine_forms(name, fraction, repeats)
        base = t[AFFINE_FORMS[0][0]]
        form_rows += [[get_workload(name).label, f"{100 * fraction:g} %", label, fmt(1e3 * median(v)),
                       f"{median_ratio(v, base):.2f}"] for label, v in t.items()]
    section.table("The affine scheme's W' written its two ways, against binary masks: the masked weights of "
                  "every masked layer, forward and backward (mask and scalar gradients), on masks with a given "
                  "fraction of entries off at random (median ms over rounds; the ratio to binary masks in the "
                  "same rounds). Training on a CPU without torch.compile takes the float-mask form, GPUs and "
                  "compiled steps the select:",
                  ["workload", "entries off", "form", "ms per step", "/ binary"], form_rows)
    _diagnose(section, kernel_rows, phase_times)
    section.seconds = time.perf_counter() - start
    return section


def _diagnose(section: Section, kernel_rows: Dict, phase_times: Dict) -> None:
    """Say where a missed ratio comes from, with the kernel and phase times just measured."""
    for name in sorted({n for n, _ in kernel_rows}):
        if not any(c.passed is False and f", {name}," in c.name for c in section.checks):
            continue
        k = {kernel: median(v) for (n, kernel), v in kernel_rows.items() if n == name}
        fwd = (phase_times[(name, "piggyback")][0] - phase_times[(name, "finetune")][0])
        bwd = (phase_times[(name, "piggyback")][1] - phase_times[(name, "finetune")][1])
        section.notes.append(
            f"**{name} missed**: its piggyback forward pass took {1e3 * fwd:+,.0f} ms and its backward "
            f"pass {1e3 * bwd:+,.0f} ms against finetuning's. The kernel table bounds what masking "
            f"itself needs: eq. 4 from {1e3 * k['eq. 4: one select (apply_mask), reused buffer']:,.0f} ms "
            f"(one select into reused memory) to {1e3 * k['eq. 4: weight * float(mask_real >= threshold), new tensor']:,.0f} ms "
            f"(float mask, fresh tensor), eq. 7 from {1e3 * k['eq. 7: grad * weight, in place']:,.0f} to "
            f"{1e3 * k['eq. 7: grad * weight, new tensor']:,.0f} ms. A gap well beyond the cheap forms "
            f"means the masked layers allocate fresh weight-sized tensors per step (page faults grow "
            f"with the number of weights: FCN-32s masks 134 M, fc6 alone 103 M at 11x11 positions).")
