#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS-gpu.md in one go, on a machine with a CUDA device:
#   bash benchmarks/gpu_check.sh OUTDIR [part]      part: steps | e2e | all (default)
# steps: the compile paths of the masking test matrix on this torch, then the
#        training-step benchmark; e2e: evaluation eager against compiled, then
#        decathlon.train end to end on a synthetic tree (about 9 minutes on an H100).
set -uo pipefail
out="${1:?usage: gpu_check.sh OUTDIR [steps|e2e|all]}"; part="${2:-all}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# decathlon's loader reads COCO-style json through pycocotools; install a local wheel if missing
if ! python3 -c "import pycocotools" 2>/dev/null && ls .whl/pycocotools-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --target /tmp/site .whl/pycocotools-*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
if [[ "$part" != e2e ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_masking_matrix.py -k "compile or inductor" 2>&1 | tail -4
  python3 -m benchmarks.gpu --out "$out/gpu-steps.md" --batches 128 32 --only \
    "piggyback eager" "finetune eager" "original-style layer eager" "piggyback compiled" "finetune compiled" \
    "piggyback eager bf16+CL" "piggyback compiled bf16+CL" "piggyback CUDA graphs" "finetune CUDA graphs" \
    "piggyback CUDA graphs CL" "finetune CUDA graphs CL" "piggyback CUDA graphs bf16+CL" "finetune CUDA graphs bf16+CL" \
    "piggyback CUDA graphs fused Adam" "piggyback CUDA graphs bf16+CL fused Adam"
fi
if [[ "$part" != steps ]]; then
  # the report is rewritten after every run, so a run cut short keeps what it measured
  python3 -m benchmarks.gpu --out "$out/gpu-e2e.md" --no-steps --eval --end-to-end /tmp/piggyback-tree --task svhn
  for d in "${TMPDIR:-/tmp}"/piggyback-e2e/*/svhn; do n="$out/e2e-runs/$(basename "$(dirname "$d")")"; mkdir -p "$n"; cp "$d"/*.json* "$n/"; done
fi
