"""Scoring generated images: FID against a cached reference set, the digit classifier's scores,
the pure-noise floor and the sampler comparison. The library behind ``python -m ddpm_hf.evaluate``
(which only parses flags and calls these) and the in-training evaluation.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass

import torch

from .config import TrainingConfig
from .data import ImageFormat, decode_in_memory, find_columns, labels_and_classes, load_source_dataset
from .errors import UserError
from .features import DigitFeatures, InceptionFeatures, classifier_scores
from .fid import FeatureStatistics, frechet_distance, precision_recall
from .files import made_once
from .generation import build_pipeline, class_labels_for, default_device, draw_images
from .reports import write_csv, write_markdown
from .seeds import Stream, generator

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "ddpm_hf")
COMPARE_SCHEDULERS = ("ddpm", "ddim")
COMPARE_STEPS = (10, 20, 50, 100, 1000)


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


PRECISION_RECALL_K = 3  # Kynkäänniemi et al.'s choice


def reference_name(config: TrainingConfig) -> str:
    return _slug(config.train_data_dir or config.dataset_name) + f"-{config.dataset_split}"


def features_of(extractor, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Apply ``extractor`` (features or probabilities) to ``images`` in batches."""
    return torch.cat([extractor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


@dataclass
class Evaluator:
    """A feature extractor with the reference statistics it is compared against, and the labelled
    reference images for the per-class scores of a conditional model."""

    extractor: DigitFeatures | InceptionFeatures
    reference: FeatureStatistics
    reference_images: torch.Tensor | None = None  # uint8, in the model's format
    reference_labels: torch.Tensor | None = None
    _reference_features: torch.Tensor | None = None  # computed on first use: cached statistics make them unnecessary for FID

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
        with made_once(stats_path):
            if os.path.isfile(stats_path):
                reference = FeatureStatistics.load(stats_path)
            else:
                reference = FeatureStatistics.of(features_of(features, images))
                reference.save(stats_path)
        return cls(features, reference, images, labels)

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """FID against the reference, plus the classifier scores for the digit extractor; with the
        ``labels`` a conditional model was asked for, also the per-class scores (`class_scores`)."""
        features = features_of(self.extractor, images)
        result = {"fid": frechet_distance(FeatureStatistics.of(features), self.reference), "num_images": len(images), "extractor": self.extractor.name}
        if isinstance(self.extractor, DigitFeatures):
            probabilities = features_of(self.extractor.probabilities, images)
            result.update(classifier_scores(probabilities))
            if labels is not None:
                # Adherence: the share of images the classifier reads as the class they were drawn for.
                result["label_accuracy"] = float((probabilities.argmax(dim=1).cpu() == labels.cpu()).double().mean())
        if labels is not None and self.reference_labels is not None:
            result.update(self.class_scores(features, labels))
        return result

    def class_scores(self, features: torch.Tensor, labels: torch.Tensor) -> dict:
        """Precision and recall (k = 3) of each class's images against as many reference images of
        that class, averaged over classes: recall is the diversity within a class that FID and the
        class histogram cannot see (a model that draws one perfect 7 for every 7 has recall near 0)."""
        if self._reference_features is None:
            self._reference_features = features_of(self.extractor, self.reference_images).cpu()
        features, labels = features.cpu(), labels.cpu()
        precisions, recalls = [], []
        for c in labels.unique().tolist():
            mine, real = features[labels == c], self._reference_features[self.reference_labels.cpu() == c]
            count = min(len(mine), len(real))
            if count <= PRECISION_RECALL_K:
                continue
            order = torch.randperm(len(real), generator=torch.Generator().manual_seed(c))[:count]  # a fixed subset of the class
            precision, recall = precision_recall(real[order], mine[:count], PRECISION_RECALL_K)
            precisions.append(precision)
            recalls.append(recall)
        if not recalls:
            return {}
        return {"class_precision": sum(precisions) / len(precisions), "class_recall": sum(recalls) / len(recalls)}


def noise_images(count: int, channels: int, resolution: int, seed: int) -> torch.Tensor:
    """Pure Gaussian noise in the model's image format: the score of a model that learned nothing."""
    x = torch.randn(count, channels, resolution, resolution, generator=generator(Stream.NOISE_BASELINE, seed))
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Sampler comparison
# ----------------------------------------------------------------------------------------------
def compare_samplers(unet, scheduler_config, evaluator: Evaluator, num_samples: int, batch_size: int, seed: int, report_dir: str,
                     schedulers=COMPARE_SCHEDULERS, steps_list=COMPARE_STEPS, guidance_scale: float = 1.0, device=None, guide=None) -> list[dict]:
    """FID and seconds per image for each (sampler, steps), autoguided by ``guide`` when given; writes
    samplers.csv, samplers.md and samplers.png."""
    rows = []
    for scheduler in schedulers:
        pipeline = build_pipeline(unet, scheduler_config, scheduler, device, guide=guide)
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
    write_csv(os.path.join(report_dir, "samplers.csv"), rows)
    columns = {"sampler": "sampler", "steps": "steps", "seconds_per_image": "s / image", "fid": "FID"}
    if "mean_confidence" in rows[0]:
        columns["mean_confidence"] = "mean confidence"
    write_markdown(os.path.join(report_dir, "samplers.md"), f"FID ({extractor} features, {num_samples} samples per row) and sampling time per image.",
                   rows, columns)
    plot_sampler_comparison(rows, os.path.join(report_dir, "samplers.png"), extractor)
