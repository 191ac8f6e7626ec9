#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS-gpu.md in one go, on a machine with a CUDA device:
#   bash benchmarks/gpu_check.sh OUTDIR [part]      part: steps | e2e | all (default)
# steps: the compile paths of the masking test matrix on this torch, then the
#        training-step benchmark; e2e: decathlon.train end to end on a synthetic tree.
set -uo pipefail
out="${1:?usage: gpu_check.sh OUTDIR [steps|e2e|all]}"; part="${2:-all}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
if [[ "$part" != e2e ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_masking_matrix.py -k "compile or inductor" 2>&1 | tail -4
  python3 -m benchmarks.gpu --out "$out/gpu-steps.md" --batches 128 32 --only \
    "piggyback eager" "finetune eager" "original-style layer eager" "piggyback compiled" "finetune compiled" \
    "piggyback eager bf16+CL" "piggyback compiled bf16+CL" "piggyback CUDA graphs" "finetune CUDA graphs"
fi
if [[ "$part" != steps ]]; then
  python3 -m benchmarks.gpu --out "$out/gpu-e2e.md" --batches 128 --only "piggyback eager" --quick \
    --end-to-end /tmp/piggyback-tree --task svhn --e2e-epochs 2
fi
