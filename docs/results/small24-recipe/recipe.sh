#!/usr/bin/env bash
# The `small` recipe from scratch with the image and decoder stages on the zero-terminal-SNR schedule
# from the start (v-prediction, trailing timesteps, the plain v loss), so that no second decoder stage
# is needed; each stage's minutes are its own log's `elapsed_s` (runs/small24/STAGE/log.jsonl).
#     bash docs/results/small24-recipe/recipe.sh [RUN]      # RUN defaults to runs/small24
set -euo pipefail
RUN=${1:-runs/small24}
PIGEON=${PIGEON:-.venv/bin/pigeon}
C=(--preset small --data data/emojiprefs --out "$RUN" --set train.reference=other_style
   --set scheduler.prediction_type=v_prediction --set scheduler.zero_terminal_snr=true
   --set scheduler.timestep_spacing=trailing)
$PIGEON train vae "${C[@]}"
$PIGEON train image "${C[@]}" --set train.style_weight=1.0 --set train.snr_gamma=0
$PIGEON train decoder "${C[@]}" --set train.history_token_share=0.5 --set train.style_weight=1.0 \
    --set train.snr_gamma=0
$PIGEON train lmm "${C[@]}"
$PIGEON train sft "${C[@]}" --set train.lr=5e-4 --set train.sft_base=true
$PIGEON train dpo "${C[@]}"
