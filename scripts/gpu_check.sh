#!/usr/bin/env bash
# A CUDA smoke check of the trainer: the cifar10 preset in bf16 and fp16, and resume equivalence
# on the GPU. Usage (from the repository root, on a GPU machine): bash scripts/gpu_check.sh OUT_DIR
set -euo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, accelerate, datasets; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
common=(--model_preset cifar10 --resolution 32 --resize_mode pad --train_batch_size 128 --logging_steps 50 --report_to none)
python3 train_ddpm.py "${common[@]}" --mixed_precision bf16 --max_train_steps 300 --save_images_steps 300 \
  --checkpointing_steps 150 --output_dir /tmp/c10-bf16 2>&1 | grep -v "it/s]" || true
python3 train_ddpm.py "${common[@]}" --mixed_precision fp16 --max_train_steps 100 --save_images_steps 0 \
  --checkpointing_steps 0 --output_dir /tmp/c10-fp16 2>&1 | grep -v "it/s]" || true
# Resume on the GPU: 40 steps straight against 20 + resume + 20 (tiny preset, fp32).
tiny=(--max_train_steps 40 --logging_steps 10 --save_images_steps 0 --report_to none --checkpointing_steps 20)
python3 train_ddpm.py "${tiny[@]}" --output_dir /tmp/straight > /dev/null 2>&1
python3 train_ddpm.py "${tiny[@]}" --output_dir /tmp/split --max_train_steps 20 > /dev/null 2>&1
python3 train_ddpm.py "${tiny[@]}" --output_dir /tmp/split --resume_from_checkpoint latest > /dev/null 2>&1
python3 - <<'PY'
from safetensors.torch import load_file
a = load_file("/tmp/straight/checkpoints/checkpoint-40/model.safetensors")
b = load_file("/tmp/split/checkpoints/checkpoint-40/model.safetensors")
print("GPU resume: max |straight - resumed| weight difference:", max((a[k] - b[k]).abs().max().item() for k in a))
PY
cp /tmp/c10-bf16/train_stats.json "$out/bf16_train_stats.json"
cp /tmp/c10-bf16/metrics.jsonl "$out/bf16_metrics.jsonl"
cp /tmp/c10-bf16/samples/step_0000300.png "$out/bf16_grid.png"
cp /tmp/c10-fp16/train_stats.json "$out/fp16_train_stats.json"
