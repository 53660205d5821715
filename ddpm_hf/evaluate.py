"""Measure a trained model: ``python -m ddpm_hf.evaluate MODEL [options]``.

- FID between generated images and the reference set (the model's training data unless told
  otherwise), with the reference statistics cached per (dataset, split, extractor, resolution).
- ``--extractor digits`` (offline) or ``inception`` (the standard FID network, local weights).
  The digit extractor also reports the entropy of the predicted-class histogram and the mean
  top-class confidence.
- ``--noise_baseline``: the same numbers for images of pure Gaussian noise.
- ``--compare-samplers``: DDPM and DDIM at several step counts: seconds per image and FID, as
  CSV, Markdown and PNG.
- ``--interpolation_grid PATH``: spherical interpolation between two noises, decoded by DDIM (eta 0).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from .cli import OneLineArgumentParser, run_command
from .config import OFFLINE_MNIST, TrainingConfig, config_from_dict
from .errors import UserError
from .features import DigitFeatures
from .generation import build_pipeline, class_labels_for, default_device, default_steps, draw_images, interpolation_grid, load_unet_and_schedule
from .scoring import COMPARE_STEPS, DEFAULT_CACHE, Evaluator, compare_samplers, noise_images, reference_name


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = OneLineArgumentParser(prog="python -m ddpm_hf.evaluate", description="FID and classifier scores for a trained DDPM pipeline.")
    parser.add_argument("model", help="a folder written by train_ddpm.py (or its best/), or a Hub model id")
    parser.add_argument("--extractor", choices=["digits", "inception"], default="digits")
    parser.add_argument("--inception_weights", default=None, help="local path of torch-fidelity's Inception weights (cannot be downloaded here)")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=64, help="images per sampling batch (64 is fastest on CPU for the small nets)")
    parser.add_argument("--scheduler", default="ddpm", choices=["ddpm", "ddim", "dpm++"])
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_name", default=None, help="reference data; default: the model's training data (training_config.json)")
    parser.add_argument("--dataset_split", default=None)
    parser.add_argument("--train_data_dir", default=None)
    parser.add_argument("--max_reference_samples", type=int, default=10_000)
    parser.add_argument("--cache_dir", default=os.environ.get("DDPM_HF_CACHE", DEFAULT_CACHE), help="classifier and reference statistics cache")
    parser.add_argument("--noise_baseline", action="store_true", help="also score images of pure Gaussian noise")
    parser.add_argument("--compare-samplers", "--compare_samplers", dest="compare_samplers", action="store_true",
                        help="DDPM and DDIM at --sampler_steps: seconds per image and FID")
    parser.add_argument("--sampler_steps", type=int, nargs="+", default=list(COMPARE_STEPS))
    parser.add_argument("--interpolation_grid", default=None, help="write a slerp interpolation grid (DDIM, eta 0) to this PNG")
    parser.add_argument("--report_dir", default=None, help="where reports go; default: MODEL/evaluation for a local model")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    for name in ("num_samples", "batch_size", "max_reference_samples"):
        if getattr(args, name) < 2:
            raise UserError(f"--{name} must be at least 2, got {getattr(args, name)}")
    return args


def training_config_of(model: str, args) -> TrainingConfig:
    """The model's own training config (for its data), with the reference flags applied."""
    path = os.path.join(model, "training_config.json")
    if not os.path.isfile(path) and os.path.isfile(os.path.join(model, os.pardir, "training_config.json")):
        path = os.path.join(model, os.pardir, "training_config.json")  # best/ inside a run folder
    values = {}
    if os.path.isfile(path):
        with open(path) as f:
            values = config_from_dict(json.load(f)).to_dict()
    if args.dataset_name is not None or args.train_data_dir is not None:  # reference data named on the command line replace the model's
        values.update(dataset_name=args.dataset_name, train_data_dir=args.train_data_dir)
    if args.dataset_split is not None:
        values["dataset_split"] = args.dataset_split
    if values.get("dataset_name") is None and values.get("train_data_dir") is None:
        values["dataset_name"] = OFFLINE_MNIST
    return TrainingConfig(**values)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    unet, scheduler_config, class_names = load_unet_and_schedule(args.model)
    unet.to(device)
    channels, resolution = unet.config.in_channels, unet.config.sample_size
    config = training_config_of(args.model, args)
    report_dir = args.report_dir or (os.path.join(args.model, "evaluation") if os.path.isdir(args.model) else "evaluation")
    evaluator = Evaluator.build(config, channels, resolution, args.extractor, args.cache_dir, args.inception_weights, args.max_reference_samples, args.seed, device)

    results = {"model": args.model, "reference": reference_name(config), "extractor": evaluator.extractor.name}
    if isinstance(evaluator.extractor, DigitFeatures):
        results["classifier_holdout_accuracy"] = evaluator.extractor.accuracy
    pipeline = build_pipeline(unet, scheduler_config, args.scheduler, device, class_names)
    steps = args.num_inference_steps or default_steps(args.scheduler, scheduler_config)
    labels = class_labels_for(pipeline, args.num_samples, None)
    started = time.perf_counter()
    images = draw_images(pipeline, args.num_samples, args.batch_size, steps, args.seed, args.eta, labels, args.guidance_scale)
    results["model_scores"] = {**evaluator.score(images), "sampler": args.scheduler, "steps": steps,
                               "seconds_per_image": (time.perf_counter() - started) / args.num_samples}
    if args.noise_baseline:
        results["noise_scores"] = evaluator.score(noise_images(args.num_samples, channels, resolution, args.seed))
    if args.compare_samplers:
        results["samplers"] = compare_samplers(unet, scheduler_config, evaluator, args.num_samples, args.batch_size, args.seed, report_dir,
                                               steps_list=args.sampler_steps, guidance_scale=args.guidance_scale, device=device)
    if args.interpolation_grid:
        interpolation_grid(unet, scheduler_config, args.interpolation_grid, seed=args.seed, guidance_scale=args.guidance_scale, device=device)
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "evaluation.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(run_command(main))
