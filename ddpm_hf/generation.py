"""Drawing images from a trained network: pipelines with a chosen sampler, replayable per-image
seeds, grids and files, interpolation. The library behind ``python -m ddpm_hf.sample`` (which only
parses flags and calls these), the in-training grids and the evaluation.

Image i of a draw is seeded by (seed, i) alone, so the same seed gives the same images whatever
the batch size, and the first 8 of 64 images are the 8 images of a draw of 8.
"""

from __future__ import annotations

import math
import os

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from tqdm.auto import tqdm

from .errors import UserError, first_line
from .pipeline import GUIDE_DIR, AutoGuidedDDPMPipeline, ClassConditionalDDPMPipeline, autoguided_prediction, guided_prediction, read_guide_record
from .seeds import Stream, generator
from .weights import run_folders


class ConsistentDDIMScheduler(DDIMScheduler):
    """DDIM that, when it clips the predicted x0 (``clip_sample``, on in every DDPM config we write),
    re-derives the noise from the clipped x0 before stepping, as improved-diffusion's ``ddim_sample``
    does. diffusers' default (``use_clipped_model_output=False``) steps with the clipped x0 but the
    network's unclipped noise: the pair no longer describes one trajectory, and the error adds up
    with every step. On the earlier 1,100-step quick-start model that drew grey backgrounds and mostly 1s
    at 1,000 steps, while the consistent form drew the same digits at 50 or 1,000 steps
    (studies/ddim/RESULTS.md). Used only for sampling; saved pipelines keep DDPMScheduler. Note that
    DDIMPipeline(scheduler=this) silently rebuilds it as a plain DDIMScheduler: set
    ``pipeline.scheduler`` afterwards, as build_pipeline does."""

    def step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool | None = None, **options):
        # DDIMPipeline passes None when its caller says nothing: that means "ours", not "off".
        consistent = True if use_clipped_model_output is None else use_clipped_model_output
        return super().step(model_output, timestep, sample, eta=eta, use_clipped_model_output=consistent, **options)


# Samplers a DDPM-trained network can use without retraining, on the training schedule (named in sample.py too).
SCHEDULERS = {
    "ddpm": lambda config: DDPMScheduler.from_config(config),
    "ddim": lambda config: ConsistentDDIMScheduler.from_config(config),
    "dpm++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_steps(scheduler: str, scheduler_config: dict) -> int:
    """Sampling steps when none are given: the whole chain for DDPM, 50 for DDIM, 20 for DPM-Solver++."""
    return {"ddpm": scheduler_config["num_train_timesteps"], "ddim": 50, "dpm++": 20}[scheduler]


def load_unet_and_schedule(model: str) -> tuple[UNet2DModel, dict, list[str] | None]:
    """The UNet, the training scheduler's config and the class names (None when unnamed) from a
    pipeline folder or Hub id."""
    if model.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(model)):
        raise UserError(f"{model} is not a folder; pass a folder written by train_ddpm.py or a Hub model id")
    try:
        unet = UNet2DModel.from_pretrained(model, subfolder="unet")
        scheduler_config = DDPMScheduler.load_config(model, subfolder="scheduler")
        class_names = ClassConditionalDDPMPipeline.load_config(model).get("class_names") if is_class_conditional(unet) else None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a trained pipeline from {model}: {first_line(e)}") from None
    return unet.eval(), scheduler_config, class_names


def load_guide(model: str, guide: str | None = None) -> tuple[UNet2DModel | None, float | None]:
    """Autoguidance's guide for ``model``, and the weight its run samples with (None when unknown).

    ``guide``: "none" for no guide; a UNet folder, a pipeline folder or a Hub id; by default the
    run's own ``guide/`` (for best/ and weights/<choice>/, the run's above them), if it has one.
    (None, None) when there is no guide."""
    if guide == "none":
        return None, None
    if guide is not None:
        if guide.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(guide)):
            raise UserError(f"--guide {guide} is not a folder; pass a folder holding a UNet (or a pipeline), a Hub id, or none")
        is_pipeline = os.path.isfile(os.path.join(guide, "model_index.json")) or os.path.isdir(os.path.join(guide, "unet"))
        try:
            return UNet2DModel.from_pretrained(guide, subfolder="unet" if is_pipeline else None).eval(), None
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a guide UNet from {guide}: {first_line(e)}") from None
    if os.path.isdir(model):
        # Above the folder, only a run's own folder counts (it holds training_config.json).
        run = next((folder for up, folder in enumerate(run_folders(model)) if os.path.isdir(os.path.join(folder, GUIDE_DIR))
                    and (up == 0 or os.path.isfile(os.path.join(folder, "training_config.json")))), None)
        record = read_guide_record(run) if run is not None else {}
    else:  # a Hub id: every guide/ is written with its guidance.json, so its absence means no guide
        record = read_guide_record(model)
        run = model if record else None
    if run is None:
        return None, None
    try:
        unet = UNet2DModel.from_pretrained(run, subfolder=GUIDE_DIR)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the guide of {model}: {first_line(e)}; pass --guide none to sample without it") from None
    return unet.eval(), record.get("guidance_scale")


def guidance_weight(asked: float | None, guide: UNet2DModel | None, run_weight: float | None) -> float:
    """The guidance scale to sample with: the one asked for; else, with a guide, the weight its run
    samples with; else 1 (no guidance)."""
    if asked is not None:
        return asked
    if guide is None:
        return 1.0
    if run_weight is None:
        raise UserError("this guide comes with no weight: give --guidance_scale w (w > 1 pushes away from the guide; 1 samples the model alone)")
    return run_weight


def is_class_conditional(unet: UNet2DModel) -> bool:
    return bool(unet.config.num_class_embeds)


def pipeline_for(unet: UNet2DModel, noise_scheduler: DDPMScheduler, class_names: list[str] | None = None) -> DDPMPipeline | ClassConditionalDDPMPipeline:
    """What a run saves: diffusers' own DDPMPipeline, or ours (with the class names) when the UNet takes class labels."""
    if is_class_conditional(unet):
        return ClassConditionalDDPMPipeline(unet=unet, scheduler=noise_scheduler, class_names=class_names)
    return DDPMPipeline(unet=unet, scheduler=noise_scheduler)


def build_pipeline(unet: UNet2DModel, scheduler_config: dict, scheduler: str, device: torch.device | None = None,
                   class_names: list[str] | None = None, guide: UNet2DModel | None = None):
    """A pipeline over ``unet`` with the chosen sampler: class-conditional if the UNet takes labels,
    autoguided by ``guide`` when one is given."""
    if scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
    noise_scheduler = SCHEDULERS[scheduler](scheduler_config)
    if guide is not None:
        if is_class_conditional(unet) or is_class_conditional(guide):
            raise UserError("autoguidance here is for unconditional models; a class-conditional one has classifier-free guidance (--guide none)")
        try:
            pipeline = AutoGuidedDDPMPipeline(unet=unet, guide=guide, scheduler=noise_scheduler)
        except ValueError as e:
            raise UserError(f"this guide does not fit the model: {e}") from None
    elif is_class_conditional(unet):
        pipeline = ClassConditionalDDPMPipeline(unet=unet, scheduler=noise_scheduler, class_names=class_names)
    elif scheduler == "ddim":  # DDIMPipeline passes eta on to the scheduler
        pipeline = DDIMPipeline(unet=unet, scheduler=noise_scheduler)
        # DDIMPipeline.__init__ rebuilds whatever scheduler it is given as a plain DDIMScheduler from
        # its config, which silently dropped ours (and its fix) from every DDIM grid and score.
        pipeline.scheduler = noise_scheduler
    else:
        pipeline = DDPMPipeline(unet=unet, scheduler=noise_scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or default_device())


def class_labels_for(pipeline, num_images: int, class_label: int | str | None) -> torch.Tensor | None:
    """Labels for a conditional model: the class asked for (by name or index), else every class in turn (balanced)."""
    if not isinstance(pipeline, ClassConditionalDDPMPipeline):
        if class_label is not None:
            raise UserError("--class_label needs a class-conditional model; this one was trained without labels")
        return None
    if class_label is not None:
        try:
            return torch.full((num_images,), pipeline.class_index(class_label))
        except ValueError:
            raise UserError(f"--class_label {class_label!r} is not a class of this model: give a name "
                            f"({', '.join(pipeline.class_names)}) or an index in 0..{pipeline.num_classes - 1}") from None
    return torch.arange(num_images) % pipeline.num_classes


def class_grid_labels(num_classes: int, images_wanted: int) -> tuple[torch.Tensor, int]:
    """Labels for a grid with one row per class: (labels in row order, images per row)."""
    per_class = max(1, round(images_wanted / num_classes))
    return torch.arange(num_classes).repeat_interleave(per_class), per_class


@torch.no_grad()
def draw_images(pipeline, num_images: int, batch_size: int, num_inference_steps: int, seed: int, eta: float = 0.0,
                class_labels: torch.Tensor | None = None, guidance_scale: float = 1.0, progress: bool = True) -> torch.Tensor:
    """(N, C, H, W) uint8 images; image i depends only on (seed, i) and the sampler settings."""
    batches = []
    starts = range(0, num_images, batch_size)
    # The bar counts denoising steps, so its time estimate is right from the first batch on.
    bar = tqdm(total=len(starts) * num_inference_steps, desc=f"sampling {num_images} images", unit="step", disable=not progress)
    pipeline.progress_bar = _advancing(bar)
    for start in starts:
        indices = range(start, min(start + batch_size, num_images))
        generators = [generator(Stream.SAMPLING, seed, i) for i in indices]
        options = dict(generator=generators, num_inference_steps=num_inference_steps, output_type="np")
        if isinstance(pipeline, ClassConditionalDDPMPipeline):
            images = pipeline(class_labels[start : start + len(indices)], guidance_scale=guidance_scale, eta=eta, **options).images
        elif isinstance(pipeline, AutoGuidedDDPMPipeline):
            images = pipeline(batch_size=len(indices), guidance_scale=guidance_scale, eta=eta, **options).images
        elif isinstance(pipeline, DDIMPipeline):
            images = pipeline(batch_size=len(indices), eta=eta, **options).images
        else:
            images = pipeline(batch_size=len(indices), **options).images
        batches.append(torch.from_numpy((np.clip(images, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))
    bar.close()
    del pipeline.progress_bar  # the pipeline's own (disabled) bar again
    return torch.cat(batches)


def _advancing(bar):
    """Stands in for DiffusionPipeline.progress_bar: iterate the timesteps, advancing ``bar``."""
    def progress_bar(iterable=None, total=None):
        for item in iterable:
            yield item
            bar.update(1)
    return progress_bar


GRID_MIN_SIDE = 64  # pixels: smaller images are enlarged (nearest neighbour) in grids, so a person can read them


def image_grid(images: np.ndarray, columns: int | None = None, row_labels: list[str] | None = None,
               caption: str | None = None, column_labels: list[str] | None = None) -> PIL.Image.Image:
    """Tile (N, H, W, C) images in [0, 1] into one PNG-ready picture, with a 2-pixel gutter; with
    ``row_labels``, each row's label on its left; with ``column_labels``, each column's above it;
    with ``caption``, a line of text on top. Images smaller than GRID_MIN_SIDE are enlarged by a
    whole factor (a 28-pixel digit becomes 84 pixels)."""
    scale = -(-GRID_MIN_SIDE // min(images.shape[1:3]))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2) if scale > 1 else images
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    gutter = 2
    canvas = np.ones((rows * (height + gutter) + gutter, columns * (width + gutter) + gutter, channels), dtype=np.float32)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        top, left = gutter + row * (height + gutter), gutter + column * (width + gutter)
        canvas[top : top + height, left : left + width] = image
    pixels = (canvas.clip(0, 1) * 255).round().astype(np.uint8)
    grid = PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    if not (row_labels or caption or column_labels):
        return grid
    return _labelled(grid, (height + gutter, width + gutter), row_labels, caption, column_labels)


CAPTION_HEIGHT = 16  # pixels above a captioned grid, and above labelled columns


def _labelled(grid: PIL.Image.Image, pitch: tuple[int, int], row_labels: list[str] | None, caption: str | None,
              column_labels: list[str] | None) -> PIL.Image.Image:
    """The grid on a white page with black text: row labels in a left margin, column labels and the caption above."""
    font = PIL.ImageFont.load_default(size=11)
    measure = PIL.ImageDraw.Draw(grid)
    margin = int(max(measure.textlength(label, font=font) for label in row_labels)) + 6 if row_labels else 0
    top = CAPTION_HEIGHT * (bool(caption) + bool(column_labels))
    width = max(grid.width + margin, int(measure.textlength(caption, font=font)) + 4 if caption else 0)
    page = PIL.Image.new(grid.mode, (width, grid.height + top), "white")
    page.paste(grid, (margin, top))
    draw = PIL.ImageDraw.Draw(page)
    if caption:
        draw.text((2, 2), caption, fill="black", font=font)
    for column, label in enumerate(column_labels or []):
        draw.text((margin + 2 + column * pitch[1], top - CAPTION_HEIGHT + 2), label, fill="black", font=font)
    for row, label in enumerate(row_labels or []):
        draw.text((2, top + 2 + row * pitch[0] + pitch[0] // 2 - 7), label, fill="black", font=font)
    return page


def save_images(images: torch.Tensor, grid: str | None, out_dir: str | None, columns: int | None = None,
                row_labels: list[str] | None = None, caption: str | None = None) -> None:
    """A grid PNG (with row labels and a caption, when given) and/or one PNG per image."""
    as_floats = images.permute(0, 2, 3, 1).float().numpy() / 255
    if grid:
        os.makedirs(os.path.dirname(os.path.abspath(grid)), exist_ok=True)
        image_grid(as_floats, columns, row_labels, caption).save(grid)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):  # each at its own size
            PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(os.path.join(out_dir, f"{i:05d}.png"))


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
                       class_label: int | None = None, guidance_scale: float = 1.0, device=None, guide: UNet2DModel | None = None) -> None:
    """Each row: slerp between two noises, decoded with deterministic DDIM (eta 0), so the row morphs smoothly."""
    pipeline = build_pipeline(unet, scheduler_config, "ddim", device)
    device = pipeline.device
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    ends = generator(Stream.INTERPOLATION, seed)
    noises = torch.stack([slerp(a, b, w) for a, b in (torch.randn((2, *shape), generator=ends) for _ in range(rows))
                          for w in np.linspace(0, 1, columns)])
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(steps, device=device)
    x = noises.to(device)
    labels = None
    if guide is not None:
        guide = guide.to(device)
    if is_class_conditional(unet):
        labels = torch.full((len(x),), class_label if class_label is not None else 0, device=device)
    for t in scheduler.timesteps:
        if labels is not None:
            output = guided_prediction(unet, x, t, labels, guidance_scale)
        else:
            output = autoguided_prediction(unet, guide, x, t, guidance_scale) if guide is not None else unet(x, t).sample
        x = scheduler.step(output, t, x, eta=0.0).prev_sample
    images = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    save_images(images, path, None, columns)
