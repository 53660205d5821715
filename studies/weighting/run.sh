#!/usr/bin/env bash
# Study 3: the per-timestep loss weighting. Five arms, identical apart from --loss_weighting:
#   simple (Ho et al.'s L_simple), snr, min_snr (gamma 5), vlb (the true bound), p2 (k 1, gamma 1).
# Each arm: train, FID of its EMA samples, bits/dim on held-out digits; then one comparison.
#   bash studies/weighting/run.sh          (about 35 minutes on 2 CPU cores)
source "$(dirname "$0")/../common.sh"
RUNS=${RUNS:-studies/weighting/runs}
for weighting in simple snr min_snr vlb p2; do
    train "$RUNS/$weighting" --loss_weighting "$weighting"
    score "$RUNS/$weighting"
    bits "$RUNS/$weighting"
done
"$PY" -m ddpm_hf.compare "$RUNS"/{simple,snr,min_snr,vlb,p2} --out studies/weighting/report
