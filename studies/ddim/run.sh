#!/usr/bin/env bash
# Why DDIM got worse with more steps, and how the fast samplers compare with DDPM-1000 once fixed.
# Scores one trained model (MODEL, default: the quick start's output, trained here if missing)
# with each sampler on the same EVAL_SAMPLES seeds:
#   DDPM (ancestral; DDPM_STEPS, default 1000), DDIM 50 and 1000 (ours), DPM-Solver++ 25, and diffusers' default
#   DDIM 50 (clipped x0 with the unclipped noise: the defect; FID_1000=1 scores 1000 steps too).
#   MODEL=PATH bash studies/ddim/run.sh        (about 25 minutes on 2 CPU cores at EVAL_SAMPLES=200)
EVAL_SAMPLES=${EVAL_SAMPLES:-200}  # before common.sh, whose default (500) is for the studies' arms
source "$(dirname "$0")/../common.sh"
MODEL=${MODEL:-ddpm-mnist-5k}
REPORT=studies/ddim/report
[ -f "$MODEL/model_index.json" ] || "$PY" train_ddpm.py configs/mnist-5k-cpu.yaml --output_dir "$MODEL"
ours=("$PY" -m ddpm_hf.evaluate)
diffusers=("$PY" studies/ddim/diffusers_ddim.py evaluate)
compare() {  # compare NAME SAMPLER STEPS...  (the command is in the array named NAME)
    local name=$1 sampler=$2; local -n command=$name; shift 2
    "${command[@]}" "$MODEL" --compare-samplers --samplers "$sampler" --sampler_steps "$@" --num_samples "$EVAL_SAMPLES" \
        --batch_size 100 --report_dir "$REPORT/$sampler-$name"
}
compare ours ddpm ${DDPM_STEPS:-1000}
compare ours ddim 50 1000
compare ours dpm++ 25
# Its 1,000-step grid (below) shows the defect; FID_1000=1 adds that score (8 minutes) to the same report.
compare diffusers ddim 50 ${FID_1000:+1000}
for steps in 50 1000; do
    "$PY" -m ddpm_hf.sample "$MODEL" --scheduler ddim --num_inference_steps $steps --num_images 16 --grid "$REPORT/ddim-$steps-ours.png"
    "$PY" studies/ddim/diffusers_ddim.py sample "$MODEL" --scheduler ddim --num_inference_steps $steps --num_images 16 --grid "$REPORT/ddim-$steps-diffusers.png"
done
# DDIM stepped by hand over lists fine in one range of t and coarse in the other (how Part 2's cause was found).
"$PY" studies/ddim/where.py "$MODEL" --grid "$REPORT/where.png"
