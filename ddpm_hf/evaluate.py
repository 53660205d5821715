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

import csv
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from .cli import OneLineArgumentParser, run_command
from .config import OFFLINE_MNIST, TrainingConfig, config_from_dict
from .data import ImageFormat, labels_and_classes, decode_in_memory, find_columns, load_source_dataset
from .errors import UserError
from .features import DigitFeatures, InceptionFeatures, classifier_scores
from .fid import FeatureStatistics, frechet_distance
from .pipeline import guided_prediction
from .sample import build_pipeline, class_labels_for, default_device, default_steps, draw_images, load_unet_and_schedule, save_images
from .seeds import derive_seed

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "ddpm_hf")
COMPARE_SCHEDULERS = ("ddpm", "ddim")
COMPARE_STEPS = (10, 20, 50, 100, 1000)
NOISE_STREAM = 4


# ----------------------------------------------------------------------------------------------
# The reference set and the evaluator
# ----------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "data"


def load_reference(config: TrainingConfig, channels: int, resolution: int, max_samples: int | None) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """The reference images (uint8, in the model's format), their labels and class count.

    Capped sets are a fixed random subset, not the first rows: some datasets (the offline digits
    among them) are sorted by class."""
    dataset = load_source_dataset(dataclasses.replace(config, streaming=False))
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=0).select(range(max_samples))
    image_column, label_column = find_columns(dataset.features, config)
    fmt = ImageFormat(mode="L" if channels == 1 else "RGB", resolution=resolution, resize_mode=config.resize_mode)
    pixels, _ = decode_in_memory(dataset, image_column, config, fmt)
    labels, num_classes = labels_and_classes(dataset, label_column)
    return torch.from_numpy(pixels), labels, num_classes


def reference_name(config: TrainingConfig) -> str:
    return _slug(config.train_data_dir or config.dataset_name) + f"-{config.dataset_split}"


def features_of(extractor, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Apply ``extractor`` (features or probabilities) to ``images`` in batches."""
    return torch.cat([extractor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@dataclass
class Evaluator:
    """A feature extractor with the reference statistics it is compared against."""

    extractor: DigitFeatures | InceptionFeatures
    reference: FeatureStatistics

    @classmethod
    def build(cls, config: TrainingConfig, channels: int, resolution: int, extractor: str = "digits", cache_dir: str = DEFAULT_CACHE,
              inception_weights: str | None = None, max_reference_samples: int | None = 10_000, seed: int = 0, device=None) -> "Evaluator":
        """Load (or compute and cache) everything the comparison needs."""
        device = device or default_device()
        images, labels, num_classes = load_reference(config, channels, resolution, max_reference_samples)
        name = reference_name(config)
        if extractor == "digits":
            if labels is None:
                raise UserError("--extractor digits trains a classifier on the reference labels, but the reference set has none; use --extractor inception")
            features = DigitFeatures.load_or_train(os.path.join(cache_dir, "classifiers", f"{name}-{resolution}px-seed{seed}.safetensors"),
                                                   images, labels, num_classes, seed, device)
        else:
            features = InceptionFeatures(inception_weights, device)
        stats_path = os.path.join(cache_dir, "stats", f"{name}-{resolution}px-{len(images)}-{features.name}.npz")
        if os.path.isfile(stats_path):
            reference = FeatureStatistics.load(stats_path)
        else:
            reference = FeatureStatistics.of(features_of(features, images))
            reference.save(stats_path)
        return cls(features, reference)

    def score(self, images: torch.Tensor) -> dict:
        """FID against the reference, plus the classifier scores for the digit extractor."""
        result = {"fid": frechet_distance(FeatureStatistics.of(features_of(self.extractor, images)), self.reference), "num_images": len(images),
                  "extractor": self.extractor.name}
        if isinstance(self.extractor, DigitFeatures):
            probabilities = features_of(self.extractor.probabilities, images)
            result.update(classifier_scores(probabilities))
        return result


def noise_images(count: int, channels: int, resolution: int, seed: int) -> torch.Tensor:
    """Pure Gaussian noise in the model's image format: the score of a model that learned nothing."""
    generator = torch.Generator().manual_seed(derive_seed(seed, NOISE_STREAM))
    x = torch.randn(count, channels, resolution, resolution, generator=generator)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Sampler comparison and interpolation
# ----------------------------------------------------------------------------------------------
def compare_samplers(unet, scheduler_config, evaluator: Evaluator, num_samples: int, batch_size: int, seed: int, report_dir: str,
                     schedulers=COMPARE_SCHEDULERS, steps_list=COMPARE_STEPS, guidance_scale: float = 1.0, device=None) -> list[dict]:
    """FID and seconds per image for each (sampler, steps); writes samplers.csv, samplers.md and samplers.png."""
    rows = []
    for scheduler in schedulers:
        pipeline = build_pipeline(unet, scheduler_config, scheduler, device)
        labels = class_labels_for(pipeline, num_samples, None)
        for steps in steps_list:
            if steps > scheduler_config["num_train_timesteps"]:
                continue
            started = time.perf_counter()
            images = draw_images(pipeline, num_samples, batch_size, steps, seed, 0.0, labels, guidance_scale, progress=False)
            seconds = time.perf_counter() - started
            score = evaluator.score(images)
            rows.append({"sampler": scheduler, "steps": steps, "seconds_per_image": seconds / num_samples, "fid": score["fid"],
                         **{k: score[k] for k in ("mean_confidence", "class_entropy_bits") if k in score}})
            print(f"{scheduler:>5} {steps:>5} steps: {seconds / num_samples:.4f} s/image, FID {score['fid']:.3f}", file=sys.stderr, flush=True)
    write_sampler_report(rows, report_dir, num_samples, evaluator.extractor.name)
    return rows


def write_sampler_report(rows: list[dict], report_dir: str, num_samples: int, extractor: str) -> None:
    from .plots import plot_sampler_comparison

    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "samplers.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"FID ({extractor} features, {num_samples} samples per row) and sampling time per image.", "",
             "| sampler | steps | s / image | FID |" + (" mean confidence |" if "mean_confidence" in rows[0] else ""),
             "|---|---:|---:|---:|" + ("---:|" if "mean_confidence" in rows[0] else "")]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['seconds_per_image']:.4f} | {r['fid']:.3f} |"
                     + (f" {r['mean_confidence']:.3f} |" if "mean_confidence" in r else ""))
    with open(os.path.join(report_dir, "samplers.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_sampler_comparison(rows, os.path.join(report_dir, "samplers.png"), extractor)


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985): stays on the shell where Gaussian noise lives, unlike a straight line."""
    a_flat, b_flat = a.flatten().double(), b.flatten().double()
    cos = torch.dot(a_flat, b_flat) / (a_flat.norm() * b_flat.norm())
    angle = torch.arccos(cos.clamp(-1, 1))
    if angle.abs() < 1e-6:
        return ((1 - weight) * a.double() + weight * b.double()).to(a.dtype)
    mixed = (torch.sin((1 - weight) * angle) * a.double() + torch.sin(weight * angle) * b.double()) / torch.sin(angle)
    return mixed.to(a.dtype)


@torch.no_grad()
def interpolation_grid(unet, scheduler_config, path: str, rows: int = 4, columns: int = 8, steps: int = 50, seed: int = 0,
                       class_label: int | None = None, guidance_scale: float = 1.0, device=None) -> None:
    """Each row: slerp between two noises, decoded with deterministic DDIM (eta 0), so the row morphs smoothly."""
    pipeline = build_pipeline(unet, scheduler_config, "ddim", device)
    device = pipeline.device
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    generator = torch.Generator().manual_seed(derive_seed(seed, NOISE_STREAM, 1))
    noises = torch.stack([slerp(a, b, w) for a, b in (torch.randn((2, *shape), generator=generator) for _ in range(rows))
                          for w in np.linspace(0, 1, columns)])
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(steps, device=device)
    x = noises.to(device)
    labels = None
    if unet.config.num_class_embeds:
        labels = torch.full((len(x),), class_label if class_label is not None else 0, device=device)
    for t in scheduler.timesteps:
        output = guided_prediction(unet, x, t, labels, guidance_scale) if labels is not None else unet(x, t).sample
        x = scheduler.step(output, t, x, eta=0.0).prev_sample
    images = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    save_images(images, path, None, columns)


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
    values.update({k: getattr(args, k) for k in ("dataset_name", "dataset_split", "train_data_dir") if getattr(args, k) is not None})
    values.setdefault("dataset_name", OFFLINE_MNIST)
    return TrainingConfig(**values)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    unet, scheduler_config = load_unet_and_schedule(args.model)
    unet.to(device)
    channels, resolution = unet.config.in_channels, unet.config.sample_size
    config = training_config_of(args.model, args)
    report_dir = args.report_dir or (os.path.join(args.model, "evaluation") if os.path.isdir(args.model) else "evaluation")
    evaluator = Evaluator.build(config, channels, resolution, args.extractor, args.cache_dir, args.inception_weights, args.max_reference_samples, args.seed, device)

    results = {"model": args.model, "reference": reference_name(config), "extractor": evaluator.extractor.name}
    if isinstance(evaluator.extractor, DigitFeatures):
        results["classifier_holdout_accuracy"] = evaluator.extractor.accuracy
    pipeline = build_pipeline(unet, scheduler_config, args.scheduler, device)
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
