"""Training diagnostics as tables (written as CSV beside a PNG): the noise schedule, the forward
process on real images, and the validation loss per region of t.

The tables come from pure functions; `write_diagnostics_at_start` and `write_timestep_profile`
put them on disk under ``output_dir/diagnostics/``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .data import to_model_input
from .objective import q_sample
from .generation import image_grid
from .plots import plot_schedule, plot_timestep_profile
from .reports import write_csv
from .seeds import Stream, generator

DIAGNOSTICS = "diagnostics"
# Where along the chain the forward-process strip looks, as fractions of T: for T = 1000 these
# are t = 0, 100, 250, 500, 750 and 999.
STRIP_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def schedule_rows(betas: torch.Tensor, alphas_cumprod: torch.Tensor) -> list[dict]:
    """beta_t, abar_t and log SNR(t) = log(abar_t / (1 - abar_t)) for every t."""
    betas, abar = betas.double().cpu(), alphas_cumprod.double().cpu()
    log_snr = abar.log() - (-abar).log1p()
    return [
        {"t": t, "beta": float(betas[t]), "alpha_bar": float(abar[t]), "log_snr": float(log_snr[t])}
        for t in range(len(betas))
    ]


def strip_timesteps(num_timesteps: int) -> list[int]:
    return [min(round(f * num_timesteps), num_timesteps - 1) for f in STRIP_FRACTIONS]


def forward_process_strip(images: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int) -> tuple[np.ndarray, list[dict]]:
    """x_t ~ q(x_t | x_0) for each image (rows) at the strip's t (columns), with one eps per image.

    :returns: the images as (rows * columns, H, W, C) floats in [0, 1] for a grid, and per-t rows
      with sqrt(abar_t), sqrt(1 - abar_t) and the measured standard deviation of x_t.
    """
    x0 = to_model_input(images.cpu())
    timesteps = strip_timesteps(len(alphas_cumprod))
    noise = torch.randn(x0.shape, generator=generator(Stream.DIAGNOSTICS, seed))
    abar = alphas_cumprod.float().cpu()
    columns = [q_sample(x0, noise, torch.full((len(x0),), t), abar) for t in timesteps]
    strip = torch.stack(columns, dim=1).flatten(0, 1)  # row-major: image by image, t along the row
    pictures = ((strip + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    rows = [
        {"t": t, "sqrt_alpha_bar": math.sqrt(float(abar[t])), "sqrt_one_minus_alpha_bar": math.sqrt(1 - float(abar[t])), "x_t_std": float(column.std())}
        for t, column in zip(timesteps, columns)
    ]
    return pictures, rows


def diagnostics_dir(output_dir: str) -> str:
    path = os.path.join(output_dir, DIAGNOSTICS)
    os.makedirs(path, exist_ok=True)
    return path


def write_diagnostics_at_start(output_dir: str, betas: torch.Tensor, alphas_cumprod: torch.Tensor, images: torch.Tensor, seed: int) -> None:
    """schedule.{csv,png} and forward_process.{csv,png} (a few training images along the chain)."""
    folder = diagnostics_dir(output_dir)
    rows = schedule_rows(betas, alphas_cumprod)
    write_csv(os.path.join(folder, "schedule.csv"), rows)
    plot_schedule(rows, os.path.join(folder, "schedule.png"))
    pictures, strip_rows = forward_process_strip(images, alphas_cumprod, seed)
    write_csv(os.path.join(folder, "forward_process.csv"), strip_rows)
    labels = [f"t={r['t']}" for r in strip_rows]
    image_grid(pictures, len(strip_rows), caption="forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps",
               column_labels=labels).save(os.path.join(folder, "forward_process.png"))


def write_timestep_profile(output_dir: str, profile: list[dict], step: int) -> str:
    """timestep_loss_step_<step>.{csv,png}: the validation loss in equal bins of t."""
    stem = os.path.join(diagnostics_dir(output_dir), f"timestep_loss_step_{step:07d}")
    write_csv(stem + ".csv", profile)
    plot_timestep_profile(profile, stem + ".png", step)
    return stem + ".png"
