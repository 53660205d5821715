"""Drawing images from a trained UNet with `diffusers` pipelines, and saving the pipeline."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel


def sampling_pipeline(unet: UNet2DModel, noise_scheduler: DDPMScheduler, sampler: str) -> DDPMPipeline | DDIMPipeline:
    """A pipeline over ``unet``: ancestral DDPM sampling, or deterministic DDIM (eta = 0) on the same schedule."""
    if sampler == "ddim":
        pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    else:
        pipeline = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(noise_scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def generate(pipeline, num_images: int, num_inference_steps: int, seed: int) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1]. The noise comes from a CPU generator seeded with ``seed``,
    so the same seed gives the same starting noise on any device and at any training step."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipeline(batch_size=num_images, generator=generator, num_inference_steps=num_inference_steps, output_type="np").images


def image_grid(images: np.ndarray, columns: int | None = None) -> PIL.Image.Image:
    """Tile (N, H, W, C) images in [0, 1] into one PNG-ready picture, with a 2-pixel gutter."""
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
    return PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
