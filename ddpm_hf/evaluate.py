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
- ``--bpd``: bits/dim, the variational bound of Ho et al. 2020 on held-out images (likelihood.py),
  exact or estimated from K stratified timesteps per image, with its terms per t as CSV and PNG.

FID runs when it is asked for (``--fid``) or when no other measurement is (``--bpd`` alone
measures only bits/dim: sampling a thousand images is the expensive part).
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
from .files import read_json, write_json
from .generation import SCHEDULERS, default_device, default_steps, guidance_weight, interpolation_grid, load_guide, load_unet_and_schedule
from .measure import bits_per_dim_report, guidance_sweep, sample_and_score
from .scoring import COMPARE_SCHEDULERS, COMPARE_STEPS, DEFAULT_CACHE, Evaluator, compare_samplers, noise_images, reference_name
from .sources import held_out_images
from .weights import resolve_weights, run_folders


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = OneLineArgumentParser(prog="python -m ddpm_hf.evaluate", description="FID and classifier scores for a trained DDPM pipeline.")
    parser.add_argument("model", help="a folder written by train_ddpm.py (or its best/), or a Hub model id")
    parser.add_argument("--weights", default=None, help="which of the run's weights: raw, or ema-<decay> for a length kept with "
                        "--extra_ema_decays (listed in MODEL/weights.json); default: the main EMA")
    parser.add_argument("--extractor", choices=["digits", "inception"], default="digits")
    parser.add_argument("--inception_weights", default=None, help="local path of torch-fidelity's Inception weights (cannot be downloaded here)")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=64, help="images per sampling batch (64 is fastest on CPU for the small nets)")
    parser.add_argument("--scheduler", default="ddpm", choices=["ddpm", "ddim", "dpm++"])
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--guidance_scale", type=float, default=None, help="conditional models: classifier-free guidance s (default 1); a model "
                        "with a guide: the autoguidance weight w (default the weight its run chose)")
    parser.add_argument("--guide", default=None, help="autoguidance's weaker model: default the run's guide/ (trained with --guide_step) "
                        "when it has one; none to measure without it; or a UNet or pipeline folder, or a Hub id")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_name", default=None, help="reference data; default: the model's training data (training_config.json)")
    parser.add_argument("--dataset_split", default=None)
    parser.add_argument("--train_data_dir", default=None)
    parser.add_argument("--max_reference_samples", type=int, default=10_000)
    parser.add_argument("--cache_dir", default=os.environ.get("DDPM_HF_CACHE", DEFAULT_CACHE), help="classifier and reference statistics cache")
    parser.add_argument("--noise_baseline", action="store_true", help="also score images of pure Gaussian noise")
    parser.add_argument("--compare-samplers", "--compare_samplers", dest="compare_samplers", action="store_true",
                        help="each of --samplers at each of --sampler_steps: seconds per image and FID")
    parser.add_argument("--sampler_steps", type=int, nargs="+", default=list(COMPARE_STEPS))
    parser.add_argument("--samplers", nargs="+", choices=list(SCHEDULERS), default=list(COMPARE_SCHEDULERS), help="samplers --compare-samplers runs")
    parser.add_argument("--interpolation_grid", default=None, help="write a slerp interpolation grid (DDIM, eta 0) to this PNG")
    parser.add_argument("--fid", action="store_true", help="FID and classifier scores (the default when no other measurement is asked for)")
    parser.add_argument("--guidance_scales", default=None, help="sweep the guidance over these scales: classifier-free guidance of a "
                        "conditional model (e.g. 0,1,2,3,5,7.5,10) or autoguidance of a model with a guide (e.g. 1,1.25,1.5,1.75,2): "
                        "FID, quality and diversity per scale (guidance.csv/.md/.png)")
    parser.add_argument("--bpd", action="store_true", help="bits/dim on held-out images: the variational bound of Ho et al. 2020")
    parser.add_argument("--bpd_timesteps", default="50", help="terms per image: 'all' for the exact bound (T network calls per image) or K "
                        "for an unbiased estimate from K stratified timesteps (default 50)")
    parser.add_argument("--bpd_images", type=int, default=256, help="how many held-out images (default 256)")
    parser.add_argument("--bpd_split", default=None, help="held-out images: a split name (test) or a fraction of the training split (0.1, as "
                        "--validation_split holds it out); default: the model's validation split, else test, else training images (with a note)")
    parser.add_argument("--report_dir", default=None, help="where reports go; default: MODEL/evaluation for a local model")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    for name in ("num_samples", "batch_size", "max_reference_samples", "bpd_images"):
        if getattr(args, name) < 2:
            raise UserError(f"--{name} must be at least 2, got {getattr(args, name)}")
    if args.bpd_timesteps != "all" and not (args.bpd_timesteps.isdigit() and int(args.bpd_timesteps) >= 1):
        raise UserError(f"--bpd_timesteps must be 'all' or a whole number of timesteps per image such as 50, got {args.bpd_timesteps!r}")
    if args.guidance_scales is not None:
        try:
            args.guidance_scales = [float(v) for v in args.guidance_scales.replace(" ", ",").split(",") if v]
        except ValueError:
            raise UserError(f"--guidance_scales takes numbers separated by commas, such as 0,1,2,5,10; got {args.guidance_scales!r}") from None
        if not args.guidance_scales or min(args.guidance_scales) < 0:
            raise UserError(f"--guidance_scales needs at least one scale, each >= 0; got {args.guidance_scales}")
    args.fid = args.fid or not (args.bpd or args.guidance_scales or args.compare_samplers)
    args.model = resolve_weights(args.model, args.weights)
    return args


def training_config_of(model: str, args) -> TrainingConfig:
    """The model's own training config (for its data), with the reference flags applied."""
    # The run's own config: in the folder, or above it for best/ and weights/<choice>/.
    candidates = [os.path.join(folder, "training_config.json") for folder in run_folders(model)]
    path = next((c for c in candidates if os.path.isfile(c)), candidates[0])
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
    guide, run_weight = load_guide(args.model, args.guide)
    guidance_scale = guidance_weight(args.guidance_scale, guide, run_weight)
    channels, resolution = unet.config.in_channels, unet.config.sample_size
    config = training_config_of(args.model, args)
    report_dir = args.report_dir or (os.path.join(args.model, "evaluation") if os.path.isdir(args.model) else "evaluation")
    results = {"model": args.model, "guidance_scale": guidance_scale, "autoguidance": guide is not None}
    if args.fid or args.noise_baseline or args.compare_samplers or args.guidance_scales:
        evaluator = Evaluator.build(config, channels, resolution, args.extractor, args.cache_dir, args.inception_weights, args.max_reference_samples, args.seed, device)
        results.update(reference=reference_name(config), extractor=evaluator.extractor.name)
        if isinstance(evaluator.extractor, DigitFeatures):
            results["classifier_holdout_accuracy"] = evaluator.extractor.accuracy
        if args.fid:
            steps = args.num_inference_steps or default_steps(args.scheduler, scheduler_config)
            results["model_scores"] = sample_and_score(unet, scheduler_config, class_names, evaluator, args.scheduler, steps, args.num_samples,
                                                       args.batch_size, args.seed, args.eta, guidance_scale, device, guide)
        if args.guidance_scales:
            steps = args.num_inference_steps or default_steps(args.scheduler, scheduler_config)
            results["guidance"] = guidance_sweep(unet, scheduler_config, class_names, evaluator, args.guidance_scales, args.scheduler, steps,
                                                 args.num_samples, args.batch_size, args.seed, args.eta, device, report_dir, guide)
        if args.noise_baseline:
            results["noise_scores"] = evaluator.score(noise_images(args.num_samples, channels, resolution, args.seed))
        if args.compare_samplers:
            results["samplers"] = compare_samplers(unet, scheduler_config, evaluator, args.num_samples, args.batch_size, args.seed, report_dir,
                                                   schedulers=args.samplers, steps_list=args.sampler_steps, guidance_scale=guidance_scale, device=device,
                                                   guide=guide)
    if args.bpd:
        per_image = None if args.bpd_timesteps == "all" else int(args.bpd_timesteps)
        T = scheduler_config["num_train_timesteps"]
        if per_image is not None and per_image > T:  # checked before the held-out images are loaded
            raise UserError(f"--bpd_timesteps {per_image} is more than the model's {T} timesteps; use --bpd_timesteps all for the exact bound")
        held_out, description = held_out_images(config, args.bpd_split, args.bpd_images, args.seed, device)
        results["bits_per_dim"] = bits_per_dim_report(unet, scheduler_config, held_out, description, per_image, args.batch_size, args.seed, report_dir)
    if args.interpolation_grid:
        interpolation_grid(unet, scheduler_config, args.interpolation_grid, seed=args.seed, guidance_scale=guidance_scale, device=device, guide=guide)
    # One file per model: a later measurement (bits/dim after FID) adds its keys to the earlier ones.
    path = os.path.join(report_dir, "evaluation.json")
    write_json(path, {**read_json(path), **results})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(run_command(main))
