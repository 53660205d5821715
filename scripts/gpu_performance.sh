#!/usr/bin/env bash
# Issue 6's GPU measurements, ready to run on a CUDA machine (from the repository root):
#   bash scripts/gpu_performance.sh OUT_DIR [throughput|quality|profile]   (no phase: all three)
# A phase at a time fits a 10-minute command on a lent GPU machine.
# 1. throughput: cifar10 in bf16 at batch 128, limit vs trainer, for the step options
#    fused / fused+channels-last / fused+channels-last+compile / foreach, with peak GPU memory;
# 2. time to quality: the fast digits recipe in bf16, channels-last, evaluated every 100 steps;
# 3. a profile of 20 trainer steps (cifar10, bf16, batch 128) to show where a gap to the limit goes.
set -euo pipefail
out=${1:-gpu-performance}
phase=${2:-all}
case "$phase" in all|throughput|quality|profile) ;; *) echo "error: unknown phase '$phase': use throughput, quality or profile" >&2; exit 2;; esac
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
if [[ $phase == all || $phase == throughput ]]; then
python3 benchmarks/throughput.py --presets cifar10 tiny --precisions bf16 --batch_size 128 \
  --json "$out/throughput.json" 2>&1 | tee "$out/throughput.txt"
fi
if [[ $phase == all || $phase == quality ]]; then
python3 benchmarks/time_to_quality.py configs/fast-digits-cpu.yaml --eval_steps 100 --eval_num_samples 200 --max_fid 20 --json "$out/time_to_quality.json" \
  --mixed_precision=bf16 --channels_last 2>&1 | grep -v "it/s" | tee "$out/time_to_quality.txt"
fi
if [[ $phase == all || $phase == profile ]]; then
python3 - "$out" <<'PY'
import sys, torch
from torch.profiler import ProfilerActivity, profile, schedule
from ddpm_hf.config import TrainingConfig
from ddpm_hf import training
config = TrainingConfig(dataset_name="mnist-5k-offline", model_preset="cifar10", resolution=32, resize_mode="pad", train_batch_size=128, mixed_precision="bf16",
                        max_train_steps=40, report_to="none", save_images_steps=0, checkpointing_steps=0, eval_batch_size=1,
                        num_inference_steps=1, output_dir="/tmp/gpu-profile", overwrite_output_dir=True)
original = training.optimisation_step
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule(wait=10, warmup=5, active=20)) as prof:
    def stepped(*args, **kwargs):
        result = original(*args, **kwargs)
        prof.step()
        return result
    training.optimisation_step = stepped
    training.train(config)
table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
open(f"{sys.argv[1]}/profile.txt", "w").write(table)
print(table)
PY
fi
