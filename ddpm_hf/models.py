"""UNet2DModel presets and the DDPMScheduler that defines the noise schedule.

`diffusers.UNet2DModel` already is the Ho et al. architecture: residual blocks with GroupNorm
and SiLU, a sinusoidal timestep embedding added in every block, and self-attention at the
resolutions we ask for. A preset only picks widths, depth and where attention goes.
"""

from __future__ import annotations

import json
import os

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor

from .config import TrainingConfig
from .errors import UserError

# Each preset lists UNet2DModel keyword arguments; sample_size and channel counts come from the data.
PRESETS: dict[str, dict] = {
    # Ho et al. 2020, appendix B, CIFAR-10: 128 channels x (1, 2, 2, 2), two residual blocks per
    # level, self-attention at 16x16 (and in the middle block), dropout 0.1: 35.7M parameters.
    # The remaining keys reproduce the original TensorFlow layout, as google/ddpm-cifar10-32 does.
    "cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1,
        attention_head_dim=None,
        norm_eps=1e-6,
        freq_shift=1,
        flip_sin_to_cos=False,
        downsample_padding=0,
    ),
    # Digits: three levels (28 -> 14 -> 7, or 32 -> 16 -> 8), attention only at the lowest one.
    "mnist": dict(
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    ),
    # The quick start's net: a quarter of tiny's parameters, narrow at full resolution (where most
    # of the compute is), attention only in the middle block (the 7x7 attention of tiny's down and
    # up blocks was the slow part under bf16 on CPU, through PyTorch's flash kernel, since replaced
    # by use_plain_attention_on_cpu). At equal images seen, nets from 0.27M to 2.4M parameters drew
    # digits equally well in this budget, so the fastest wins: 370 images/s against tiny's ~185
    # under bf16 when it was chosen (benchmarks/RESULTS.md, "Quick-start recipe").
    "micro": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    # CPU-friendly: narrow, one residual block per level; the offline default and the tests.
    "tiny": dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
}


def _read_model_config(name_or_path: str) -> dict:
    """Keys from a UNet2DModel config.json (a file, or a folder with config.json or unet/config.json)."""
    candidates = [name_or_path, os.path.join(name_or_path, "config.json"), os.path.join(name_or_path, "unet", "config.json")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise UserError(f"--model_config_name_or_path {name_or_path}: no config.json found there")
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"--model_config_name_or_path {path} is not valid JSON: {e}") from None
    # Keys that describe a saved file, not the architecture.
    return {k: v for k, v in values.items() if not k.startswith("_")}


def unet_config(config: TrainingConfig, channels: int, resolution: int, num_class_embeds: int | None = None) -> dict:
    """The full UNet2DModel config for this run: the preset, overridden by a user config, fitted to the data."""
    values = dict(PRESETS[config.model_preset])
    if config.model_config_name_or_path:
        values.update(_read_model_config(config.model_config_name_or_path))
    values.update(sample_size=resolution, in_channels=channels, out_channels=channels)
    if num_class_embeds is not None:
        values["num_class_embeds"] = num_class_embeds
    check_resolution(values, resolution, config.model_preset)
    return values


def check_resolution(values: dict, resolution: int, preset: str) -> None:
    """Each level but the last halves the image, so the side must divide by 2^(levels - 1)."""
    levels = len(values["down_block_types"])
    factor = 2 ** (levels - 1)
    if resolution % factor:
        suggestion = ((resolution + factor - 1) // factor) * factor
        raise UserError(
            f"resolution {resolution} does not suit the '{preset}' UNet: its {levels} levels need a multiple of {factor}; "
            f"use --resolution {suggestion} --resize_mode pad (or crop), or another --model_preset"
        )


def build_unet(values: dict) -> UNet2DModel:
    try:
        return UNet2DModel(**values)
    except (TypeError, ValueError) as e:
        raise UserError(f"the UNet2DModel config is invalid: {e}") from None


def use_plain_attention_on_cpu(unet: UNet2DModel, device: torch.device) -> None:
    """On a CPU, let the UNet's attention layers multiply out softmax(QK^T)V (diffusers'
    AttnProcessor) instead of calling scaled_dot_product_attention.

    There PyTorch picks its CPU flash-attention kernel, whose backward is built for long
    sequences: on the 49 to 196 positions of a digit UNet it took 15% of the micro net's training
    step, and plain attention trains `tiny` 1.55x and `micro` about 1.1x faster under bf16 at
    batch 32, with the same sampling speed (benchmarks/RESULTS.md, "Attention on the CPU"). GPUs
    keep the fused kernels, which are fast there."""
    if device.type != "cpu":
        return
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())


def build_noise_scheduler(config: TrainingConfig) -> DDPMScheduler:
    """The forward process and the DDPM sampler in one diffusers object, saved with the pipeline."""
    return DDPMScheduler(
        num_train_timesteps=config.ddpm_num_steps,
        beta_schedule=config.ddpm_beta_schedule,
        prediction_type=config.prediction_type,
    )


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
