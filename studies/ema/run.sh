#!/usr/bin/env bash
# Study 2: which weights to sample, from one run: the raw weights, a short EMA (decay 0.99), and
# the main EMA (max decay 0.9999 with EMAModel's warm-up, power 3/4: 0.9944 by step 1,000). A
# third average, 0.999, is kept too: below ~10,000 steps the warm-up caps it exactly where it caps
# the main one, so it must score the same (a check). One run of the base recipe with a cosine
# learning-rate decay, 1,000 steps (the quick start's length), scored every 250 steps while it
# trains; then each weight set: FID and a grid.
#   bash studies/ema/run.sh        (about 20 minutes on 2 CPU cores)
source "$(dirname "$0")/../common.sh"
RUN=${RUN:-studies/ema/runs/cosine-1000}
REPORT=studies/ema/report
[ -f "$RUN/weights.json" ] || "$PY" train_ddpm.py studies/base.yaml --output_dir "$RUN" --max_train_steps 1000 \
    --lr_scheduler cosine --extra_ema_decays 0.999 0.99 --eval_steps 250 --eval_num_samples 500 \
    --num_inference_steps 50 --save_images_steps 500 --report_to none
mkdir -p "$REPORT"
for weights in ema-0.9999 ema-0.999 ema-0.99 raw; do
    score "$RUN" --weights "$weights" --report_dir "$REPORT/$weights"
    "$PY" -m ddpm_hf.sample "$RUN" --weights "$weights" --num_images 16 "${EVAL_SAMPLER[@]}" --grid "$REPORT/$weights.png"
done
