# Settings every study shares, sourced by each studies/<name>/run.sh. One place, so that the arms
# of a study differ only in what the study varies.
#
# The budget: each study must run in about 45 minutes on a 2-core CPU, so each arm trains the
# studies' fixed baseline (studies/base.yaml: the earlier quick start's `tiny`, batch 64, 5,000 offline
# digits) for STEPS steps, not a full-length run, and is scored on EVAL_SAMPLES samples. Override any of these from the
# environment, e.g. `STEPS=1100 EVAL_SAMPLES=1000 bash studies/weighting/run.sh`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
STEPS=${STEPS:-500}
EVAL_SAMPLES=${EVAL_SAMPLES:-500}
# Ancestral DDPM with 50 steps: on nets this young the deterministic samplers (DDIM, DPM-Solver++)
# score far worse (studies/ddim/RESULTS.md), and 50 ancestral steps cost a fifth of 250.
EVAL_SAMPLER=(--scheduler ddpm --num_inference_steps 50)

# train OUTPUT_DIR [train_ddpm.py flags]: one arm. Holds out 10% of the digits (the curves,
# the per-timestep profiles and bits/dim are measured on them). Rerunning a finished arm only
# re-saves its pipeline (the config resumes from `latest`).
train() {
    local out=$1; shift
    "$PY" train_ddpm.py studies/base.yaml --output_dir "$out" --max_train_steps "$STEPS" \
        --validation_split 0.1 --validation_steps 100 --save_images_steps 0 --checkpointing_steps 250 \
        --report_to none "$@"
}

# score RUN [evaluate flags]: FID and classifier scores of the EMA samples.
score() {
    local run=$1; shift
    "$PY" -m ddpm_hf.evaluate "$run" --fid --num_samples "$EVAL_SAMPLES" --batch_size 100 "${EVAL_SAMPLER[@]}" "$@"
}

# bits RUN: bits/dim on 256 held-out digits, 50 stratified timesteps per image.
bits() {
    "$PY" -m ddpm_hf.evaluate "$1" --bpd --bpd_timesteps 50 --bpd_images 256 --batch_size 128
}
