"""Measurements of a trained model that the evaluate command combines: scores of sampled images
and bits/dim on held-out images, each also writing its report files."""

from __future__ import annotations

import os
import sys
import time

from .data import to_model_input
from .errors import UserError
from .generation import build_pipeline, class_labels_for, draw_images
from .likelihood import VariationalBound, measure_bits_per_dim
from .reports import write_csv, write_markdown
from .scoring import Evaluator
from .sources import ValidationImages


def sample_and_score(unet, scheduler_config, class_names, evaluator: Evaluator, scheduler: str, steps: int, num_samples: int, batch_size: int,
                     seed: int, eta: float, guidance_scale: float, device, guide=None) -> dict:
    """Draw ``num_samples`` images (every class in turn for a conditional model; autoguided by
    ``guide`` when given) and score them."""
    pipeline = build_pipeline(unet, scheduler_config, scheduler, device, class_names, guide)
    labels = class_labels_for(pipeline, num_samples, None)
    started = time.perf_counter()
    images = draw_images(pipeline, num_samples, batch_size, steps, seed, eta, labels, guidance_scale)
    seconds = time.perf_counter() - started
    return {**evaluator.score(images, labels), "sampler": scheduler, "steps": steps, "seconds_per_image": seconds / num_samples}


def bits_per_dim_report(unet, scheduler_config, held_out: ValidationImages, description: str, timesteps_per_image: int | None,
                        batch_size: int, seed: int, report_dir: str) -> dict:
    """The bound on ``held_out`` (exact, or from ``timesteps_per_image`` stratified terms per image);
    writes bits_per_dim.csv (L_t per t) and bits_per_dim.png to ``report_dir``."""
    from .plots import plot_bits_per_dim_terms

    try:
        bound = VariationalBound.from_scheduler_config(scheduler_config)
    except ValueError as e:
        raise UserError(f"--bpd: {e}") from None
    T = bound.schedule.num_timesteps
    conditional = bool(unet.config.num_class_embeds)
    if conditional and held_out.labels is None:
        raise UserError("--bpd on a class-conditional model needs labelled held-out images; the chosen images have no labels")
    labels = held_out.labels if conditional else None
    result = measure_bits_per_dim(bound, unet.eval(), to_model_input(held_out.images), labels, timesteps_per_image, batch_size, seed)
    os.makedirs(report_dir, exist_ok=True)
    write_csv(os.path.join(report_dir, "bits_per_dim.csv"), result.per_timestep)
    terms = "all" if result.exact else f"{result.timesteps_per_image} stratified"
    title = f"{result.bits_per_dim:.4f} ± {result.std_error:.4f} bits/dim: {terms} of {T} terms per image\n{description}"
    plot_bits_per_dim_terms(result.per_timestep, os.path.join(report_dir, "bits_per_dim.png"), title)
    print(f"bits/dim: {result.bits_per_dim:.4f} ± {result.std_error:.4f} (standard error; {terms} of {T} terms per image; {description})", file=sys.stderr)
    return {**result.summary(), "images": description, "conditional_on_labels": conditional}


def guidance_sweep(unet, scheduler_config, class_names, evaluator: Evaluator, scales: list[float], scheduler: str, steps: int,
                   num_samples: int, batch_size: int, seed: int, eta: float, device, report_dir: str, guide=None) -> list[dict]:
    """Guidance at each scale in ``scales``, on the same noises: classifier-free guidance of a
    conditional model (class-balanced labels), or autoguidance by ``guide``. Scored for quality
    (FID, mean confidence; with labels, label accuracy and class precision) and diversity (class
    entropy; with labels, class recall). Writes guidance.csv, guidance.md and guidance.png."""
    from .plots import plot_guidance_sweep

    pipeline = build_pipeline(unet, scheduler_config, scheduler, device, class_names, guide)
    labels = class_labels_for(pipeline, num_samples, None)
    if labels is None and guide is None:
        raise UserError("--guidance_scales needs a class-conditional model (trained with --class_conditional) or a guide for autoguidance "
                        "(trained with --guide_step, or --guide PATH); this one has neither")
    rows = []
    for scale in scales:
        started = time.perf_counter()
        images = draw_images(pipeline, num_samples, batch_size, steps, seed, eta, labels, scale, progress=False)
        seconds = time.perf_counter() - started
        score = evaluator.score(images, labels)
        row = {"guidance_scale": scale, "fid": score["fid"], "seconds_per_image": seconds / num_samples}
        row.update({k: score[k] for k in GUIDANCE_COLUMNS if k in score})
        rows.append(row)
        print(f"guidance {scale:g}: FID {score['fid']:.3f}" + "".join(f", {k} {score[k]:.3f}" for k in GUIDANCE_COLUMNS if k in score),
              file=sys.stderr, flush=True)
    os.makedirs(report_dir, exist_ok=True)
    write_csv(os.path.join(report_dir, "guidance.csv"), rows)
    if guide is None:
        intro = (f"Classifier-free guidance sweep: {num_samples} images per scale ({scheduler.upper()} {steps} steps, seed {seed}, every class in turn), "
                 f"{evaluator.extractor.name} features. Quality: FID, mean confidence, label accuracy, class precision. Diversity: class recall "
                 "(Kynkäänniemi et al. 2019, k = 3, within each class), class entropy.")
    else:
        intro = (f"Autoguidance sweep (guide + w (model - guide)): {num_samples} images per weight ({scheduler.upper()} {steps} steps, seed {seed}), "
                 f"{evaluator.extractor.name} features. Quality: FID, mean confidence. Diversity: class entropy (log2 10 = 3.32 for ten equal classes).")
    headers = {"guidance_scale": "s" if guide is None else "w", "fid": "FID", "seconds_per_image": "s / image", "mean_confidence": "mean confidence", "label_accuracy": "label accuracy",
               "class_precision": "class precision", "class_recall": "class recall", "class_entropy_bits": "class entropy (bits)"}
    write_markdown(os.path.join(report_dir, "guidance.md"), intro, rows, {k: v for k, v in headers.items() if k in rows[0]})
    plot_guidance_sweep(rows, os.path.join(report_dir, "guidance.png"), "autoguidance" if guide is not None else "classifier-free guidance")
    return rows


GUIDANCE_COLUMNS = ("mean_confidence", "label_accuracy", "class_precision", "class_recall", "class_entropy_bits")
