#!/usr/bin/env bash
# The training package on a CUDA GPU, tiny sizes (a minute): stage 1 with bf16 mixed precision, stage 2 on a tiny
# Llama chat LLM (built here from a transformers config, nothing downloaded) with bf16 autocast, then the trained
# checkpoint loaded by blip2 in fp16 on the GPU and asked a question. Run from the repository root; logs in $1.
set -euo pipefail
out=${1:-gpu-train-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1
MP=${MIXED_PRECISION:-bf16}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-fp16}
python3 -c "import sys; sys.path.insert(0, 'tests'); from conftest import build_tiny_llm; build_tiny_llm('$out/tiny_llm')"
python3 -m training stage1 --config training/configs/stage1_tiny.yaml output_dir="$out/stage1" \
    data.cache_dir="$out/features" train.mixed_precision="$MP" 2>&1 | tee "$out/stage1.log" | tail -3
python3 -m training stage2 --config training/configs/stage2_tiny.yaml output_dir="$out/stage2" \
    init_from="$out/stage1/stage1" llm="$out/tiny_llm" data.cache_dir="$out/features" \
    train.mixed_precision="$MP" 2>&1 | tee "$out/stage2.log" | tail -3
python3 - "$out" "$DEVICE" "$PRECISION" <<'PY'
import sys, warnings
warnings.simplefilter("ignore")
import torch
import blip2
out, device, precision = sys.argv[1:]
model = blip2.load(f"{out}/stage2/checkpoint", precision=precision, device=device)
print(model.info.summary())
print("LLM on", model.llm_input_device, model.llm_dtype, "| Q-Former", model.qformer.layernorm.weight.dtype)
from PIL import Image
print("answer:", repr(model.ask(Image.new("RGB", (64, 64), "red"), "what colour is it?", max_new_tokens=8)))
if torch.cuda.is_available():
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
PY
