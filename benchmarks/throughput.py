#!/usr/bin/env python
"""How close the trainer gets to the network's own cost, per preset and precision.

    python benchmarks/throughput.py                       # CPU: tiny and mnist, fp32
    python benchmarks/throughput.py --presets cifar10 --precisions bf16 --batch_size 128   # a GPU
    python benchmarks/throughput.py --step_options fused fused,channels_last,compile foreach   # compare step options
    python benchmarks/throughput.py --short               # CI: a few steps, checks it runs

For each (preset, precision) two measurements, each in a fresh process so peak memory is its own:

- limit: the bare network step on synthetic tensors already on the device: UNet forward, MSE,
  backward, gradient clipping, AdamW step; nothing else.
- trainer: the real `ddpm_hf.training.train` loop on the offline digits (RGB noise images for the
  cifar10 preset): data path, noise and timestep sampling, EMA, metrics logging every 50 steps,
  timed from its own metrics rows after the first logging interval (the warm-up).

Both are timed in 50-step windows (the trainer's logging interval), over --rounds rounds that
alternate limit and trainer, and each reports its best window: a busy neighbour on a shared machine
only ever slows a window down, so the best window is the cost of the step itself, and alternating
keeps a slow minute from landing on one side only. Every window is kept in the JSON.

Each comma-separated --step_options entry (fused or foreach AdamW, channels_last, compile) applies
to both measurements; on CUDA both use TF32, as the trainer does by default.

Also sampling throughput: DDIM with 50 steps and DDPM with 1000 steps. Prints a table and
writes JSON (--json, default benchmarks/throughput.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The trainer's default logging interval: its first one is the warm-up, and both sides are timed
# in windows of this many steps (the trainer's metrics rows are its windows).
INTERVAL = 50


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shape(preset: str) -> tuple[int, int]:
    """(channels, resolution) the preset is benchmarked at: digits for tiny/mnist, CIFAR-10 for cifar10."""
    return (3, 32) if preset == "cifar10" else (1, 28)


def measure_limit(preset: str, precision: str, batch_size: int, steps: int, warmup: int, options: set[str]) -> dict:
    import torch

    from ddpm_hf.config import TrainingConfig
    from ddpm_hf.metrics import peak_memory_bytes
    from ddpm_hf.models import build_unet, unet_config, use_plain_attention_on_cpu

    device = _device()
    channels, resolution = _shape(preset)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the trainer (--allow_tf32)
    layout = torch.channels_last if "channels_last" in options else torch.contiguous_format
    model = build_unet(unet_config(TrainingConfig(model_preset=preset), channels, resolution)).to(device, memory_format=layout).train()
    use_plain_attention_on_cpu(model, device)  # the attention the trainer uses
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused="foreach" not in options, foreach="foreach" in options)
    if "compile" in options:
        model = torch.compile(model)
    x_t = torch.randn(batch_size, channels, resolution, resolution, device=device).contiguous(memory_format=layout)
    target = torch.randn_like(x_t)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.mse_loss(model(x_t, t).sample.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    windows = []
    for _ in range(steps // INTERVAL):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(INTERVAL):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        windows.append(INTERVAL * batch_size / (time.perf_counter() - started))
    peak, kind = peak_memory_bytes(device)
    return {"window_images_per_s": windows, "peak_memory_bytes": peak, "peak_memory_kind": kind}


def _rgb_dataset(folder: str, count: int = 512) -> str:
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(count)]
    datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(count)]},
                               features=datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})).save_to_disk(folder)
    return folder


def measure_trainer(preset: str, precision: str, batch_size: int, steps: int, options: set[str]) -> dict:
    from ddpm_hf.config import TrainingConfig
    from ddpm_hf.training import train

    with tempfile.TemporaryDirectory() as scratch:
        dataset = _rgb_dataset(os.path.join(scratch, "rgb")) if preset == "cifar10" else "mnist-5k-offline"
        config = TrainingConfig(
            dataset_name=dataset, model_preset=preset, train_batch_size=batch_size, mixed_precision=precision if precision != "fp32" else "no",
            max_train_steps=INTERVAL + steps, report_to="none", save_images_steps=0, checkpointing_steps=0,
            output_dir=os.path.join(scratch, "run"), eval_batch_size=1, num_inference_steps=1,
            optimizer_implementation="foreach" if "foreach" in options else "fused", channels_last="channels_last" in options,
            torch_compile="compile" in options,
        )
        stats = train(config)
        with open(os.path.join(config.output_dir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    # One row per logging interval (INTERVAL steps), each with the images/s of its optimisation steps.
    return {"window_images_per_s": [r["images_per_s"] for r in rows if r["step"] > INTERVAL],
            "peak_memory_bytes": stats["peak_memory_bytes"], "peak_memory_kind": stats["peak_memory_kind"]}


def best_of_rounds(measurements: list[dict]) -> dict:
    """Merge one side's rounds: the best window's images/s, every window, and the highest peak memory."""
    windows = [w for m in measurements for w in m["window_images_per_s"]]
    peak = max(measurements, key=lambda m: m["peak_memory_bytes"] or 0)
    return {"images_per_s": max(windows), "window_images_per_s": windows,
            "peak_memory_bytes": peak["peak_memory_bytes"], "peak_memory_kind": peak["peak_memory_kind"]}


def measure_sampling(preset: str, count: int, ddpm_steps_timed: int = 1000) -> dict:
    """Images/s of DDIM-50 and of DDPM over all 1000 steps. ``ddpm_steps_timed`` < 1000 (--short)
    times that many DDPM steps and scales to 1000: every step costs the same network call."""
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    from ddpm_hf.config import TrainingConfig
    from ddpm_hf.models import build_unet, unet_config

    device = _device()
    channels, resolution = _shape(preset)
    unet = build_unet(unet_config(TrainingConfig(model_preset=preset), channels, resolution)).to(device).eval()
    result = {}
    for name, pipeline_class, scheduler_class, steps, timed in (("ddim_50", DDIMPipeline, DDIMScheduler, 50, 50),
                                                                ("ddpm_1000", DDPMPipeline, DDPMScheduler, 1000, ddpm_steps_timed)):
        pipeline = pipeline_class(unet=unet, scheduler=scheduler_class(num_train_timesteps=1000))
        pipeline.set_progress_bar_config(disable=True)
        with torch.no_grad():
            pipeline(batch_size=count, num_inference_steps=2, output_type="np")  # warm-up
            started = time.perf_counter()
            pipeline(batch_size=count, num_inference_steps=timed, output_type="np")
        result[f"{name}_images_per_s"] = count / ((time.perf_counter() - started) * steps / timed)
    return result


def measure_one(kind: str, preset: str, precision: str, batch_size: int, steps: int, warmup: int, options: str = "fused") -> dict:
    """One measurement in this process: ``kind`` is limit, trainer or sampling (``steps``: DDPM steps timed, 0 for all)."""
    if kind == "limit":
        return measure_limit(preset, precision, batch_size, steps, warmup, set(options.split(",")))
    if kind == "trainer":
        return measure_trainer(preset, precision, batch_size, steps, set(options.split(",")))
    return measure_sampling(preset, batch_size, steps or 1000)


def measure(kind: str, preset: str, precision: str, batch_size: int, steps: int, warmup: int, options: str = "fused",
            fresh: bool = True) -> dict:
    """One measurement, by default in a fresh interpreter so that none inherits another's allocator
    state, threads or compiled graphs. --short measures in this process: it checks that the code
    runs, not its figures, and two interpreter start-ups were most of its time."""
    if not fresh:
        return measure_one(kind, preset, precision, batch_size, steps, warmup, options)
    command = [sys.executable, os.path.abspath(__file__), "--_one", kind, preset, precision, str(batch_size), str(steps), str(warmup), options]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{kind} {preset} {precision} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=None, help="default: tiny mnist on CPU, tiny mnist cifar10 on a GPU")
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp32 on CPU; fp32 bf16 (and fp16) on a GPU")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 64 on CPU, 128 on a GPU")
    parser.add_argument("--steps", type=int, default=100, help="measured steps per round after the warm-up (a multiple of 50)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating limit/trainer rounds; each side reports its best 50-step window")
    parser.add_argument("--sampling_images", type=int, default=16)
    parser.add_argument("--step_options", nargs="+", default=None,
                        help="comma-separated sets of fused|foreach, channels_last, compile; default: fused on CPU, "
                             "fused / fused,channels_last / fused,channels_last,compile / foreach on a GPU")
    parser.add_argument("--short", action="store_true", help="a few steps of the tiny preset (DDPM sampling timed over 50 of its 1000 steps): "
                        "checks the benchmark runs, not its figures")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "throughput.json"))
    parser.add_argument("--_one", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._one:
        kind, preset, precision, batch_size, steps, warmup, options = args._one
        print(json.dumps(measure_one(kind, preset, precision, int(batch_size), int(steps), int(warmup), options)))
        return 0

    import torch

    gpu = torch.cuda.is_available()
    presets = args.presets or (["tiny"] if args.short else ["tiny", "mnist"] + (["cifar10"] if gpu else []))
    precisions = args.precisions or (["fp32"] if not gpu else ["fp32", "bf16"] + (["fp16"] if not torch.cuda.is_bf16_supported() else []))
    batch_size = args.batch_size or (8 if args.short else 128 if gpu else 64)
    steps = INTERVAL if args.short else args.steps
    rounds = 1 if args.short else args.rounds
    if steps % INTERVAL or steps <= 0 or rounds <= 0:
        parser.error(f"--steps must be a positive multiple of {INTERVAL} and --rounds positive")
    variants = args.step_options or (["fused", "fused,channels_last", "fused,channels_last,compile", "foreach"] if gpu and not args.short else ["fused"])
    device = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    print(f"device: {device} | torch {torch.__version__} | batch {batch_size} | {rounds} x {steps} measured steps after a {INTERVAL}-step warm-up, best {INTERVAL}-step window")
    rows = []
    header = f"{'preset':<8} {'precision':<9} {'step options':<28} {'limit img/s':>12} {'trainer img/s':>14} {'ratio':>6} {'limit peak MB':>14} {'trainer peak MB':>16}"
    print(header)
    for preset, precision, options in itertools.product(presets, precisions, variants):
        limits, trainers = [], []
        for _ in range(rounds):
            limits.append(measure("limit", preset, precision, batch_size, steps, INTERVAL if not args.short else 2, options, fresh=not args.short))
            trainers.append(measure("trainer", preset, precision, batch_size, steps, 0, options, fresh=not args.short))
        limit, trainer = best_of_rounds(limits), best_of_rounds(trainers)
        ratio = trainer["images_per_s"] / limit["images_per_s"]
        row = {"preset": preset, "precision": precision, "step_options": options, "batch_size": batch_size,
               "limit": limit, "trainer": trainer, "ratio": ratio}
        rows.append(row)
        print(f"{preset:<8} {precision:<9} {options:<28} {limit['images_per_s']:>12.1f} {trainer['images_per_s']:>14.1f} {ratio:>6.3f} "
              f"{limit['peak_memory_bytes'] / 2**20:>14.0f} {trainer['peak_memory_bytes'] / 2**20:>16.0f}", flush=True)
    # --short times 50 of DDPM's 1000 steps and scales (the 1000 network calls were most of its time).
    sampling = {preset: measure("sampling", preset, "fp32", 2 if args.short else args.sampling_images, 50 if args.short else 0, 0, fresh=not args.short)
                for preset in presets}
    for preset, figures in sampling.items():
        print(f"sampling {preset}: DDIM-50 {figures['ddim_50_images_per_s']:.2f} img/s, DDPM-1000 {figures['ddpm_1000_images_per_s']:.3f} img/s")
    with open(args.json, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rounds": rounds, "window_steps": INTERVAL, "rows": rows, "sampling": sampling}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
