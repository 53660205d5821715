#!/usr/bin/env bash
# Study 1: what the net predicts (eps, x0 or v) and the noise schedule each suits (linear or
# cosine), at equal images seen. Six arms, identical apart from --prediction_type and
# --ddpm_beta_schedule; the losses are compared on one scale (validation eps-MSE), and by FID.
#   bash studies/targets/run.sh          (about 35 minutes on 2 CPU cores)
source "$(dirname "$0")/../common.sh"
RUNS=${RUNS:-studies/targets/runs}
arms=()
for schedule in linear squaredcos_cap_v2; do
    for target in epsilon sample v_prediction; do
        arm="$RUNS/$target-${schedule%%_*}"
        train "$arm" --prediction_type "$target" --ddpm_beta_schedule "$schedule"
        score "$arm"
        arms+=("$arm")
    done
done
"$PY" -m ddpm_hf.compare "${arms[@]}" --out studies/targets/report
