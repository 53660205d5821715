"""The pipeline a run saves, the labels of a class grid, and image grids."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from .pipeline import ClassConditionalDDPMPipeline


def is_class_conditional(unet: UNet2DModel) -> bool:
    return bool(unet.config.num_class_embeds)


def pipeline_for(unet: UNet2DModel, noise_scheduler: DDPMScheduler) -> DDPMPipeline | ClassConditionalDDPMPipeline:
    """What a run saves: diffusers' own DDPMPipeline, or ours when the UNet takes class labels."""
    if is_class_conditional(unet):
        return ClassConditionalDDPMPipeline(unet=unet, scheduler=noise_scheduler)
    return DDPMPipeline(unet=unet, scheduler=noise_scheduler)


def class_grid_labels(num_classes: int, images_wanted: int) -> tuple[torch.Tensor, int]:
    """Labels for a grid with one row per class: (labels in row order, images per row)."""
    per_class = max(1, round(images_wanted / num_classes))
    return torch.arange(num_classes).repeat_interleave(per_class), per_class


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
