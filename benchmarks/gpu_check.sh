#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS-gpu.md in one go, on a machine with a CUDA device:
#   bash benchmarks/gpu_check.sh OUTDIR [part]      part: steps | e2e | affine | all (default)
# steps: the compile paths of the masking test matrix on this torch, then the
#        training-step benchmark; e2e: evaluation eager against compiled, then
#        decathlon.train end to end on a synthetic tree (about 9 minutes on an H100);
# affine: the affine mask scheme against binary masks: the training step (piggyback,
#        binary and affine, eager, compiled and CUDA graphs, batch 128 and 32; part A)
#        into OUTDIR/gpu-affine.md, then classification.train (ResNet-50, 224 px) and
#        segmentation.train (FCN-32s) end to end on synthetic trees, binary and affine,
#        then classification finetuned (part D), the report rewritten after every run,
#        the runs' logs in OUTDIR/training-runs.tar.gz. On an H200, binary and affine
#        eager and compiled at batch 128 with part D took 385 s with the compile tests
#        (BENCHMARKS-gpu.md 6e); the full part, with CUDA graphs and batch 32, takes longer
#        than one 10-minute call: split it with --only; one cut short keeps the runs done.
# all: steps, e2e and affine in turn.
set -uo pipefail
out="${1:?usage: gpu_check.sh OUTDIR [steps|e2e|affine|all]}"; part="${2:-all}"
case "$part" in
  steps|e2e|affine|all) ;;
  *) echo "gpu_check.sh: unknown part '$part' (expected steps, e2e, affine or all)" >&2; exit 2 ;;
esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# decathlon's loader reads COCO-style json through pycocotools; install a local wheel if missing
if ! python3 -c "import pycocotools" 2>/dev/null && ls .whl/pycocotools-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target /tmp/site .whl/pycocotools-*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
if [[ "$part" == steps || "$part" == all ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_masking_matrix.py -k "compile or inductor" 2>&1 | tail -4
  python3 -m benchmarks.gpu --out "$out/gpu-steps.md" --batches 128 32 --only \
    "piggyback eager" "finetune eager" "original-style layer eager" "piggyback compiled" "finetune compiled" \
    "piggyback eager bf16+CL" "piggyback compiled bf16+CL" "piggyback CUDA graphs" "finetune CUDA graphs" \
    "piggyback CUDA graphs CL" "finetune CUDA graphs CL" "piggyback CUDA graphs bf16+CL" "finetune CUDA graphs bf16+CL" \
    "piggyback CUDA graphs fused Adam" "piggyback CUDA graphs bf16+CL fused Adam"
fi
if [[ "$part" == e2e || "$part" == all ]]; then
  # the report is rewritten after every run, so a run cut short keeps what it measured
  python3 -m benchmarks.gpu --out "$out/gpu-e2e.md" --no-steps --eval --end-to-end /tmp/piggyback-tree --task svhn
  for d in "${TMPDIR:-/tmp}"/piggyback-e2e/*/svhn; do n="$out/e2e-runs/$(basename "$(dirname "$d")")"; mkdir -p "$n"; cp "$d"/*.json* "$n/"; done
fi
if [[ "$part" == affine || "$part" == all ]]; then
  python3 -m benchmarks.gpu --out "$out/gpu-affine.md" --batches 128 32 --only \
    "piggyback eager" "piggyback compiled" "piggyback CUDA graphs" "binary eager" "binary compiled" \
    "binary CUDA graphs" "affine eager" "affine compiled" "affine CUDA graphs" \
    --training-e2e /tmp/piggyback-training
  # the runs' config.json, log.jsonl and metrics.json in one archive
  runs="${TMPDIR:-/tmp}/piggyback-training-e2e"; dest="$(cd "$out" && pwd)/training-runs.tar.gz"
  (cd "$runs" 2>/dev/null && tar -czf "$dest" $(ls -d */*.json */*.jsonl 2>/dev/null))
fi
