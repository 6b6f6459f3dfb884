#!/bin/bash
# The small recipe from the VAE stage on, with the tokenizer fix (dead-code restarts, serving-side budget).
set -e
cd /work/main
source .venv/bin/activate
COMMON="--preset small --data demo/data/emojiprefs --out runs/small2 --set train.reference=other_style"
pigeon train image $COMMON --set train.steps=1500
pigeon train lmm $COMMON
pigeon train sft $COMMON --set train.steps=800
pigeon train dpo $COMMON
echo ALLDONE
