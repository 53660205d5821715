"""Validation loss on held-out images, its per-timestep profile, and early stopping.

The diffusion loss of one example is random: it depends on the t and the noise drawn. So each
validation example gets one (t, eps) pair, drawn once from the run's seed and kept: every
evaluation, on any number of processes and after any resume, measures the same quantity, and
two evaluations of the same weights give the same number. The t are stratified over [0, T), so
every region of the schedule is represented and the per-timestep profile has data in each bin.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .data import to_model_input
from .sources import ValidationImages
from .objective import DiffusionObjective, sample_timesteps
from .seeds import Stream, generator

PROFILE_BINS = 20


@dataclass
class ValidationSet:
    """Held-out images with their fixed diffusion draws, all on the training device."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor | None
    timesteps: torch.Tensor  # (N,) fixed t per example
    noise: torch.Tensor  # (N, C, H, W) fixed eps per example

    def __len__(self) -> int:
        return len(self.images)


def make_validation_set(held_out: ValidationImages, num_timesteps: int, seed: int) -> ValidationSet:
    """Attach one (t, eps) per example, drawn on the CPU from ``seed`` so every device gets the same."""
    draws = generator(Stream.VALIDATION, seed)
    count, shape = len(held_out), tuple(held_out.images.shape[1:])
    timesteps = sample_timesteps(count, num_timesteps, "stratified", draws)
    noise = torch.randn((count, *shape), generator=draws)
    device = held_out.images.device
    return ValidationSet(held_out.images, held_out.labels, timesteps.to(device), noise.to(device))


@torch.no_grad()
def validation_losses(unet, validation: ValidationSet, objective: DiffusionObjective, accelerator, batch_size: int,
                      class_conditional: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-example validation losses (N,) and eps-space errors (N,, see
    `DiffusionObjective.losses_and_eps_errors`), identical on every process; ``class_conditional``:
    the network takes the examples' labels.

    Each process evaluates one contiguous share of the set (padded to equal length, as
    all-gather needs), the shares are gathered, and the padding is dropped.
    """
    count, world_size, rank = len(validation), accelerator.num_processes, accelerator.process_index
    share = math.ceil(count / world_size)
    positions = torch.arange(rank * share, (rank + 1) * share, device=validation.images.device)
    real = positions < count
    positions = positions.clamp(max=count - 1)
    losses, eps_errors = [], []
    for start in range(0, share, batch_size):
        index = positions[start : start + batch_size]
        labels = validation.labels[index] if class_conditional else None
        with accelerator.autocast():
            x0 = to_model_input(validation.images[index])
            loss, eps_error = objective.losses_and_eps_errors(unet, x0, validation.noise[index], validation.timesteps[index], labels)
        losses.append(loss.float())
        eps_errors.append(eps_error.float())
    empty = torch.zeros(0, device=positions.device)
    mine = torch.stack([torch.cat(losses) if losses else empty, torch.cat(eps_errors) if eps_errors else empty], dim=1)  # (share, 2)
    gathered, kept = accelerator.gather(mine), accelerator.gather(real.long())  # gloo cannot gather bools
    gathered = gathered[kept.bool()]
    return gathered[:, 0], gathered[:, 1]


def timestep_profile(losses: torch.Tensor, timesteps: torch.Tensor, num_timesteps: int, bins: int = PROFILE_BINS,
                     eps_errors: torch.Tensor | None = None) -> list[dict]:
    """Mean loss in ``bins`` equal bins of t: where along the chain the model struggles; with
    ``eps_errors``, their mean too (``mean_eps_mse``: comparable across targets and weightings)."""
    edges = torch.linspace(0, num_timesteps, bins + 1).round().long().tolist()
    losses, timesteps = losses.double().cpu(), timesteps.cpu()
    rows = []
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (timesteps >= low) & (timesteps < high)
        count = int(inside.sum())
        row = {"t_start": low, "t_end": high - 1, "mean_loss": float(losses[inside].mean()) if count else float("nan"), "count": count}
        if eps_errors is not None:
            row["mean_eps_mse"] = float(eps_errors.double().cpu()[inside].mean()) if count else float("nan")
        rows.append(row)
    return rows


@dataclass
class EarlyStopping:
    """Track the best validation loss; say when ``patience`` validations in a row did not beat it by ``min_delta``."""

    patience: int | None
    min_delta: float = 0.0
    best_loss: float | None = None
    best_step: int | None = None
    validations_without_improvement: int = 0
    stopped: bool = False

    def observe(self, loss: float, step: int) -> bool:
        """Record one validation; True when it is a new best (and the best model should be saved)."""
        if self.best_loss is None or loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.validations_without_improvement = loss, step, 0
            return True
        self.validations_without_improvement += 1
        if self.patience is not None and self.validations_without_improvement >= self.patience:
            self.stopped = True
        return False

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("patience", "min_delta")}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
