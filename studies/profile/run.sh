#!/usr/bin/env bash
# Study 4: the per-timestep loss over training. Every validation (each 100 steps) measures the
# eps-MSE of 500 held-out digits in 20 bands of 50 timesteps, with fixed (t, noise) per digit,
# so the bands are comparable across steps and runs. Reuses the weighting study's L_simple and
# min-SNR arms (trained here if missing: about 10 minutes on 2 CPU cores).
#   bash studies/profile/run.sh
source "$(dirname "$0")/../common.sh"
RUNS=${RUNS:-studies/weighting/runs}
[ -f "$RUNS/simple/model_index.json" ] || train "$RUNS/simple" --loss_weighting simple
[ -f "$RUNS/min_snr/model_index.json" ] || train "$RUNS/min_snr" --loss_weighting min_snr
"$PY" -m ddpm_hf.compare "$RUNS/simple" "$RUNS/min_snr" --out studies/profile/report
