#!/usr/bin/env bash
# Paper Fig. 5 at small scale: stage 2 + VQA fine-tune WITH the stage-1 Q-Former vs WITHOUT stage-1 representation
# learning (Q-Former from MiniLM/BERT, as in the paper's ablation). Both arms: the same configs
# (training/configs/ablation/: the default recipe's stage 2, and its VQA step as the figures were measured), data,
# seed and budget; both evaluated on the same easy-vqa test questions, loss curves plotted to assets/ablation.png.
# Needs runs/default/stage1 (the first step of training/train_default.sh). ~40 min on 2 CPU cores.
# Both arms see the same batches in the same order.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1
STAGE2_STEPS="${STAGE2_STEPS:-50}" VQA_STEPS="${VQA_STEPS:-150}" LIMIT="${LIMIT:-1000}"
BERT_QFORMER=(init_from=null qformer.init=bert qformer.num_hidden_layers=4 qformer.cross_attention_frequency=2
              qformer.num_query_tokens=16 qformer.max_text_length=24 qformer.image_feature_norm=layernorm)

for arm in with without; do
    init=(init_from=runs/default/stage1/stage1)
    [ "$arm" = without ] && init=("${BERT_QFORMER[@]}")
    out=runs/ablation/$arm
    [ -f $out/stage2/final_metrics.json ] || python -m training stage2 --config training/configs/ablation/stage2.yaml \
        --resume output_dir=$out/stage2 train.steps=$STAGE2_STEPS "${init[@]}"
    [ -f $out/vqa/final_metrics.json ] || python -m training finetune --task vqa --config training/configs/ablation/vqa.yaml \
        --resume output_dir=$out/vqa init_from=$out/stage2/checkpoint train.steps=$VQA_STEPS
    [ -f $out/eval_vqa.json ] || python -m training eval --task vqa --checkpoint $out/vqa/checkpoint \
        --data easyvqa:test --protocol greedy --limit "$LIMIT" --output $out
done
python -m training.plot_runs --output assets/ablation.png --titles "stage 2 (captions),VQA fine-tune" \
    "with stage 1=runs/ablation/with/stage2,runs/ablation/with/vqa" \
    "without stage 1=runs/ablation/without/stage2,runs/ablation/without/vqa"
