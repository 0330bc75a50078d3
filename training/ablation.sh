#!/usr/bin/env bash
# Paper Fig. 5 at small scale: stage 2 WITH the stage-1 Q-Former vs WITHOUT stage-1 representation learning
# (Q-Former from MiniLM/BERT, as in the paper's ablation). Both arms: the same configs, data, seed, batches in the
# same order and budget; evaluated on the same held-out data, loss curves plotted.
#
#   bash training/ablation.sh                 # the default recipe (training/configs/ablation/stage2.yaml, then its
#                                             # VQA step vqa.yaml); easy-vqa test; assets/ablation.png. Needs
#                                             # runs/default/stage1 (train_default.sh's first step). ~40 min.
#   RECIPE=naming bash training/ablation.sh   # the naming data (ablation/naming.yaml: captions, naming questions,
#                                             # easy-vqa); naming on training and held-out emoji, easy-vqa test;
#                                             # assets/ablation_naming.png. Trains stage1_naming.yaml first if
#                                             # runs/stage1_naming is missing. ~60 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1
RECIPE="${RECIPE:-default}" LIMIT="${LIMIT:-1000}"
BERT_QFORMER=(init_from=null qformer.init=bert qformer.num_hidden_layers=4 qformer.cross_attention_frequency=2
              qformer.num_query_tokens=16 qformer.max_text_length=24 qformer.image_feature_norm=layernorm)

evaluate() {  # checkpoint, output folder
    [ -f "$2/eval_vqa.json" ] || python -m training eval --task vqa --checkpoint "$1" --data easyvqa:test \
        --protocol greedy --limit "$LIMIT" --output "$2"
    [ "$RECIPE" = naming ] || return 0
    [ -f "$2/eval_naming_emoji_train.json" ] || python -m training eval --task naming --checkpoint "$1" \
        --data emoji:train --protocol greedy --limit 200 --output "$2"
    [ -f "$2/eval_naming_emoji_test.json" ] || python -m training eval --task naming --checkpoint "$1" \
        --data emoji:test --protocol greedy --output "$2"
}

case "$RECIPE" in
    default) STAGE1=runs/default/stage1/stage1 OUT=runs/ablation PLOT=assets/ablation.png
             STAGE2_STEPS="${STAGE2_STEPS:-50}" VQA_STEPS="${VQA_STEPS:-150}" ;;
    naming)  STAGE1=runs/stage1_naming/stage1 OUT=runs/ablation_naming PLOT=assets/ablation_naming.png
             STAGE2_STEPS="${STAGE2_STEPS:-300}"
             [ -f runs/stage1_naming/final_metrics.json ] || python -m training fetch-data
             [ -f runs/stage1_naming/final_metrics.json ] || python -m training stage1 --resume \
                 --config training/configs/stage1_naming.yaml ;;
    *) echo "RECIPE must be default or naming, not $RECIPE" >&2; exit 2 ;;
esac

for arm in with without; do
    init=(init_from=$STAGE1)
    [ "$arm" = without ] && init=("${BERT_QFORMER[@]}")
    out=$OUT/$arm
    if [ "$RECIPE" = naming ]; then
        [ -f $out/stage2/final_metrics.json ] || python -m training stage2 --config training/configs/ablation/naming.yaml \
            --resume output_dir=$out/stage2 train.steps=$STAGE2_STEPS "${init[@]}"
        evaluate $out/stage2/checkpoint $out
    else
        [ -f $out/stage2/final_metrics.json ] || python -m training stage2 --config training/configs/ablation/stage2.yaml \
            --resume output_dir=$out/stage2 train.steps=$STAGE2_STEPS "${init[@]}"
        [ -f $out/vqa/final_metrics.json ] || python -m training finetune --task vqa \
            --config training/configs/ablation/vqa.yaml --resume output_dir=$out/vqa init_from=$out/stage2/checkpoint \
            train.steps=$VQA_STEPS
        evaluate $out/vqa/checkpoint $out
    fi
done
if [ "$RECIPE" = naming ]; then
    python -m training.plot_runs --output $PLOT --titles "stage 2 (naming data: captions and questions)" \
        "with stage 1=$OUT/with/stage2" "without stage 1=$OUT/without/stage2"
else
    python -m training.plot_runs --output $PLOT --titles "stage 2 (captions),VQA fine-tune" \
        "with stage 1=$OUT/with/stage2,$OUT/with/vqa" "without stage 1=$OUT/without/stage2,$OUT/without/vqa"
fi
