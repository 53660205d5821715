"""Draw images from a trained pipeline: ``python -m ddpm_hf.sample MODEL [options]``.

MODEL is a local folder written by train_ddpm.py (or its ``best/``) or a Hub model id. Image i
of a run is seeded by (seed, i) alone, so the same seed gives the same images whatever the
batch size, and ``--num_images 8`` gives the first 8 of ``--num_images 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from tqdm.auto import tqdm

from .cli import OneLineArgumentParser, run_command
from .errors import UserError
from .pipeline import ClassConditionalDDPMPipeline
from .sampling import image_grid
from .seeds import derive_seed

# Samplers a DDPM-trained network can use without retraining, on the training schedule.
SCHEDULERS = {
    "ddpm": lambda config: DDPMScheduler.from_config(config),
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpm++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
}
SAMPLE_STREAM = 3  # seeds (seed, SAMPLE_STREAM, i): apart from the training loop's (seed, step, micro)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_unet_and_schedule(model: str) -> tuple[UNet2DModel, dict]:
    """The UNet and the training scheduler's config from a pipeline folder or Hub id."""
    if model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise UserError(f"{model} is not a folder; pass a folder written by train_ddpm.py or a Hub model id")
    try:
        unet = UNet2DModel.from_pretrained(model, subfolder="unet")
        scheduler_config = DDPMScheduler.load_config(model, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a trained pipeline from {model}: {str(e).strip().splitlines()[0]}") from None
    return unet.eval(), scheduler_config


def build_pipeline(unet: UNet2DModel, scheduler_config: dict, scheduler: str, device: torch.device | None = None):
    """A pipeline over ``unet`` with the chosen sampler (class-conditional if the UNet takes labels)."""
    if scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
    noise_scheduler = SCHEDULERS[scheduler](scheduler_config)
    if unet.config.num_class_embeds:
        pipeline = ClassConditionalDDPMPipeline(unet=unet, scheduler=noise_scheduler)
    elif scheduler == "ddim":  # DDIMPipeline passes eta on to the scheduler
        pipeline = DDIMPipeline(unet=unet, scheduler=noise_scheduler)
    else:
        pipeline = DDPMPipeline(unet=unet, scheduler=noise_scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or default_device())


def class_labels_for(pipeline, num_images: int, class_label: int | None) -> torch.Tensor | None:
    """Labels for a conditional model: the one asked for, else every class in turn (balanced)."""
    if not isinstance(pipeline, ClassConditionalDDPMPipeline):
        if class_label is not None:
            raise UserError("--class_label needs a class-conditional model; this one was trained without labels")
        return None
    if class_label is not None:
        if not 0 <= class_label < pipeline.num_classes:
            raise UserError(f"--class_label must be in 0..{pipeline.num_classes - 1} for this model, got {class_label}")
        return torch.full((num_images,), class_label)
    return torch.arange(num_images) % pipeline.num_classes


@torch.no_grad()
def draw_images(pipeline, num_images: int, batch_size: int, num_inference_steps: int, seed: int, eta: float = 0.0,
                class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0, progress: bool = True) -> torch.Tensor:
    """(N, C, H, W) uint8 images; image i depends only on (seed, i) and the sampler settings."""
    batches = []
    for start in tqdm(range(0, num_images, batch_size), desc="sampling", unit="batch", disable=not progress):
        indices = range(start, min(start + batch_size, num_images))
        generators = [torch.Generator("cpu").manual_seed(derive_seed(seed, SAMPLE_STREAM, i)) for i in indices]
        options = dict(generator=generators, num_inference_steps=num_inference_steps, output_type="np")
        if isinstance(pipeline, ClassConditionalDDPMPipeline):
            images = pipeline(class_labels[start : start + len(indices)], guidance_scale=guidance_scale, eta=eta, **options).images
        elif isinstance(pipeline, DDIMPipeline):
            images = pipeline(batch_size=len(indices), eta=eta, **options).images
        else:
            images = pipeline(batch_size=len(indices), **options).images
        batches.append(torch.from_numpy((np.clip(images, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))
    return torch.cat(batches)


def save_images(images: torch.Tensor, grid: str | None, out_dir: str | None, columns: int | None = None) -> None:
    """A grid PNG and/or one PNG per image."""
    as_floats = images.permute(0, 2, 3, 1).float().numpy() / 255
    if grid:
        os.makedirs(os.path.dirname(os.path.abspath(grid)), exist_ok=True)
        image_grid(as_floats, columns).save(grid)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for i, image in enumerate(as_floats):
            image_grid(image[None], 1).crop((2, 2, 2 + image.shape[1], 2 + image.shape[0])).save(os.path.join(out_dir, f"{i:05d}.png"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m ddpm_hf.sample", description="Draw images from a trained DDPM pipeline.")
    parser.add_argument("model", help="a folder written by train_ddpm.py (or its best/), or a Hub model id")
    parser.add_argument("--scheduler", default="ddpm", choices=sorted(SCHEDULERS), help="sampler on the training schedule (default ddpm)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: T for ddpm, 50 for ddim, 20 for dpm++")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale: 0 deterministic, 1 like DDPM")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class_label", type=int, default=None, help="conditional models: draw this class (default: every class in turn)")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="conditional models: eps_uncond + s (eps_cond - eps_uncond)")
    parser.add_argument("--grid", default=None, help="write a grid of all images to this PNG")
    parser.add_argument("--out_dir", default=None, help="write one PNG per image into this folder")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise UserError(f"--num_inference_steps must be a positive integer, got {args.num_inference_steps}")
    if args.guidance_scale < 0 or args.eta < 0:
        raise UserError("--guidance_scale and --eta must be >= 0")
    if not args.grid and not args.out_dir:
        raise UserError("say where the images go: --grid PATH and/or --out_dir DIR")
    return args


def default_steps(scheduler: str, scheduler_config: dict) -> int:
    return {"ddpm": scheduler_config["num_train_timesteps"], "ddim": 50, "dpm++": 20}[scheduler]


def main(argv=None) -> None:
    args = parse_args(argv)
    unet, scheduler_config = load_unet_and_schedule(args.model)
    device = torch.device(args.device) if args.device else default_device()
    pipeline = build_pipeline(unet, scheduler_config, args.scheduler, device)
    steps = args.num_inference_steps or default_steps(args.scheduler, scheduler_config)
    if steps > scheduler_config["num_train_timesteps"]:
        raise UserError(f"--num_inference_steps {steps} exceeds the model's {scheduler_config['num_train_timesteps']} training steps")
    labels = class_labels_for(pipeline, args.num_images, args.class_label)
    images = draw_images(pipeline, args.num_images, args.batch_size, steps, args.seed, args.eta, labels, args.guidance_scale)
    # A conditional grid drawn class by class reads best with one column per class.
    columns = pipeline.num_classes if labels is not None and args.class_label is None and args.num_images >= pipeline.num_classes else None
    save_images(images, args.grid, args.out_dir, columns)
    written = [p for p in (args.grid, args.out_dir) if p]
    print(json.dumps({"images": args.num_images, "scheduler": args.scheduler, "steps": steps, "seed": args.seed, "written": written}))


if __name__ == "__main__":
    sys.exit(run_command(main))
