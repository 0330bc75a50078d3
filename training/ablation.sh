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

# Per recipe: the stage-1 Q-Former of the "with" arm, stage 2's config, the VQA fine-tune after it (none: the arms
# are evaluated after stage 2), and where results and the plot go.
case "$RECIPE" in
    default) STAGE1=runs/default/stage1/stage1 STAGE2=stage2 VQA=vqa OUT=runs/ablation PLOT=assets/ablation.png
             STAGE2_STEPS="${STAGE2_STEPS:-50}" VQA_STEPS="${VQA_STEPS:-150}"
             TITLES="stage 2 (captions),VQA fine-tune" ;;
    naming)  STAGE1=runs/stage1_naming/stage1 STAGE2=naming VQA= OUT=runs/ablation_naming
             PLOT=assets/ablation_naming.png
             STAGE2_STEPS="${STAGE2_STEPS:-300}" TITLES="stage 2 (naming data: captions and questions)"
             if [ ! -f runs/stage1_naming/final_metrics.json ]; then
                 python -m training fetch-data
                 python -m training stage1 --resume --config training/configs/stage1_naming.yaml
             fi ;;
    *) echo "RECIPE must be default or naming, not $RECIPE" >&2; exit 2 ;;
esac

curves=()
for arm in with without; do
    init=(init_from=$STAGE1)
    [ "$arm" = without ] && init=("${BERT_QFORMER[@]}")
    out=$OUT/$arm
    [ -f $out/stage2/final_metrics.json ] || python -m training stage2 --config training/configs/ablation/$STAGE2.yaml \
        --resume output_dir=$out/stage2 train.steps=$STAGE2_STEPS "${init[@]}"
    last=$out/stage2
    if [ -n "$VQA" ]; then
        [ -f $out/vqa/final_metrics.json ] || python -m training finetune --task vqa \
            --config training/configs/ablation/$VQA.yaml --resume output_dir=$out/vqa init_from=$out/stage2/checkpoint \
            train.steps=$VQA_STEPS
        last=$out/vqa
    fi
    evaluate $last/checkpoint $out
    runs=$out/stage2
    [ -n "$VQA" ] && runs=$runs,$out/vqa
    curves+=("$arm stage 1=$runs")
done
python -m training.plot_runs --output $PLOT --titles "$TITLES" "${curves[@]}"
