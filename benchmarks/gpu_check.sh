#!/usr/bin/env bash
# The GPU checks in one go (run on a CUDA machine from the repository root): token parity with transformers in
# fp16/bf16/int8/nf4 on tiny official-format checkpoints, then bench_gpu.py (memory and decode speed at
# blip2-opt-2.7b size). Logs and JSON go to $1 (default: gpu-check/).
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$out/gpu.txt"
BLIP2_TEST_DEVICE=cuda BLIP2_TEST_PRECISIONS=${PRECISIONS:-fp16,bf16,int8,nf4} \
  timeout "${PARITY_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider tests/blip2/test_official_parity.py 2>&1 \
  | tee "$out/parity.log" | tail -40
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_gpu.py --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
