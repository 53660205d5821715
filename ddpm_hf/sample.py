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

from .cli import OneLineArgumentParser, run_command
from .errors import UserError
from .weights import resolve_weights

SCHEDULER_NAMES = ("ddim", "ddpm", "dpm++")  # generation.SCHEDULERS, named here so that flags are checked before torch loads


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m ddpm_hf.sample", description="Draw images from a trained DDPM pipeline.")
    parser.add_argument("model", help="a folder written by train_ddpm.py (or its best/), or a Hub model id")
    parser.add_argument("--weights", default=None, help="which of the run's weights: raw, or ema-<decay> for a length kept with "
                        "--extra_ema_decays (listed in MODEL/weights.json); default: the main EMA")
    parser.add_argument("--scheduler", default="ddpm", choices=SCHEDULER_NAMES, help="sampler on the training schedule (default ddpm)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: T for ddpm, 50 for ddim, 20 for dpm++")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale: 0 deterministic, 1 like DDPM")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class_label", default=None, help="conditional models: draw this class, by name or index (default: every class in turn)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="conditional models: s in eps_uncond + s (eps_cond - eps_uncond), "
                        "default 1; a model with a guide: w in guide + w (model - guide), default the weight its run chose")
    parser.add_argument("--guide", default=None, help="autoguidance's weaker model: default the run's guide/ (trained with --guide_step) "
                        "when it has one; none to sample without it; or a UNet or pipeline folder, or a Hub id")
    parser.add_argument("--grid", default=None, help="write a grid of all images to this PNG")
    parser.add_argument("--out_dir", default=None, help="write one PNG per image into this folder")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    for name in ("num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise UserError(f"--num_inference_steps must be a positive integer, got {args.num_inference_steps}")
    if (args.guidance_scale is not None and args.guidance_scale < 0) or args.eta < 0:
        raise UserError("--guidance_scale and --eta must be >= 0")
    if not args.grid and not args.out_dir:
        raise UserError("say where the images go: --grid PATH and/or --out_dir DIR")
    if args.model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(args.model)):
        raise UserError(f"{args.model} is not a folder; pass a folder written by train_ddpm.py or a Hub model id")
    args.model = resolve_weights(args.model, args.weights)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # Imported once the flags are valid: a mistake is reported in about a second, not after torch and diffusers load.
    import torch

    from .generation import (build_pipeline, class_labels_for, default_device, default_steps, draw_images, guidance_weight, load_guide,
                             load_unet_and_schedule, save_images)

    unet, scheduler_config, class_names = load_unet_and_schedule(args.model)
    guide, run_weight = load_guide(args.model, args.guide)
    guidance_scale = guidance_weight(args.guidance_scale, guide, run_weight)
    device = torch.device(args.device) if args.device else default_device()
    pipeline = build_pipeline(unet, scheduler_config, args.scheduler, device, class_names, guide)
    steps = args.num_inference_steps or default_steps(args.scheduler, scheduler_config)
    if steps > scheduler_config["num_train_timesteps"]:
        raise UserError(f"--num_inference_steps {steps} exceeds the model's {scheduler_config['num_train_timesteps']} training steps")
    labels = class_labels_for(pipeline, args.num_images, args.class_label)
    images = draw_images(pipeline, args.num_images, args.batch_size, steps, args.seed, args.eta, labels, guidance_scale)
    # A conditional grid drawn class by class reads best with one column per class.
    columns = pipeline.num_classes if labels is not None and args.class_label is None and args.num_images >= pipeline.num_classes else None
    caption = (f"{args.scheduler.upper()} {steps} steps, seed {args.seed}" + (f", {args.weights} weights" if args.weights else "")
               + (f", class {pipeline.class_names[int(labels[0])]}" if args.class_label is not None else "")
               + (f", autoguidance w={guidance_scale:g}" if guide is not None else ""))
    save_images(images, args.grid, args.out_dir, columns, caption=caption)
    written = [p for p in (args.grid, args.out_dir) if p]
    print(json.dumps({"images": args.num_images, "scheduler": args.scheduler, "steps": steps, "seed": args.seed, "guidance_scale": guidance_scale,
                      "autoguidance": guide is not None, "written": written}))


if __name__ == "__main__":
    sys.exit(run_command(main))
