"""One optimisation step, and the running sums between two log lines.

Randomness is replayable: everything a step draws (noise, timesteps, flips, dropped labels,
dropout) comes from generators seeded by (stream, seed, step, micro-batch) and is drawn for the
*global* batch, of which each process takes its slice. A resumed run therefore repeats the
uninterrupted one, and the data and noise do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from .data import to_model_input
from .resample import TimestepSampler
from .seeds import Stream, derive_seed, generator


@dataclass
class MicroBatchDraws:
    """Everything random about one micro-batch, for this process's slice of the global batch."""

    noise: torch.Tensor  # eps
    timesteps: torch.Tensor  # t
    weights: torch.Tensor  # the timestep sampler's importance weight per example (1 unless loss-aware)
    flips: torch.Tensor  # horizontal flip per example
    drop_labels: torch.Tensor  # class-conditional runs: replace the label by the null class
    global_timesteps: torch.Tensor  # t of the whole global micro-batch (every process draws them all)


def draw_micro_batch(seed: int, step: int, micro: int, shape: tuple, sampler: TimestepSampler, cond_drop_prob: float,
                     rank: int, world_size: int, device: torch.device) -> MicroBatchDraws:
    """The draws of the global micro-batch (step, micro), sliced to this process's share."""
    micro_batch = shape[0]
    global_batch = micro_batch * world_size
    noise_draws = generator(Stream.STEP_NOISE, seed, step, micro, device=device)
    noise = torch.randn((global_batch, *shape[1:]), generator=noise_draws, device=device)
    # A stream of its own, on the host for a sampler whose probabilities live there.
    timestep_draws = generator(Stream.TIMESTEPS, seed, step, micro, device="cpu" if sampler.draws_on_host else device)
    timesteps, weights = sampler.sample(global_batch, timestep_draws)
    timesteps, weights = timesteps.to(device), weights.to(device)
    flips = torch.rand(global_batch, generator=noise_draws, device=device) < 0.5
    drops = torch.rand(global_batch, generator=noise_draws, device=device) < cond_drop_prob
    mine = slice(rank * micro_batch, (rank + 1) * micro_batch)
    return MicroBatchDraws(noise=noise[mine], timesteps=timesteps[mine], weights=weights[mine], flips=flips[mine],
                           drop_labels=drops[mine], global_timesteps=timesteps)


def conditioning_labels(labels: torch.Tensor, drop: torch.Tensor, null_label: int) -> torch.Tensor:
    """Labels with the dropped ones replaced by the null class (classifier-free guidance training)."""
    return torch.where(drop, torch.full_like(labels, null_label), labels)


@dataclass
class StepOutcome:
    """What a step reports, as device tensors (reading them would make the host wait)."""

    loss: torch.Tensor  # mean over the step's micro-batches
    grad_norm: torch.Tensor
    applied: torch.Tensor  # bool: False when a non-finite loss or gradient skipped the update
    timesteps: torch.Tensor  # the last micro-batch's, for the report of a skipped step
    losses_by_t: torch.Tensor  # (2, TIMESTEP_BINS): this process's summed per-example losses and their count per bin of t


def optimisation_step(run) -> StepOutcome:
    """One optimizer step of ``run`` (a `ddpm_hf.run.Run`) over ``gradient_accumulation_steps``
    micro-batches, then the EMA update.

    A non-finite loss, or a non-finite gradient without an fp16 grad scaler (which skips those
    itself), skips the update: no optimizer step, no EMA update. With fused AdamW the decision
    stays on the device (see apply_update), so on a GPU the step never waits for the host."""
    config, accelerator, step = run.config, run.accelerator, run.progress.step
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    accumulation = config.gradient_accumulation_steps
    step_loss = torch.zeros((), device=device)
    losses_by_t = torch.zeros(2, TIMESTEP_BINS, device=device)
    for micro in range(accumulation):
        images, labels = run.data.next_batch(step, micro, accumulation)
        cond_drop_prob = config.cond_drop_prob if config.class_conditional else 0.0
        draws = draw_micro_batch(config.seed, step, micro, tuple(images.shape), run.timestep_sampler, cond_drop_prob, rank, world_size, device)
        x0, noise = to_model_input(images), draws.noise
        if config.channels_last:
            x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
        if run.random_flip:
            x0 = torch.where(draws.flips[:, None, None, None], x0.flip(-1), x0)
        class_labels = conditioning_labels(labels, draws.drop_labels, run.data.num_classes) if config.class_conditional else None
        torch.manual_seed(derive_seed(Stream.DROPOUT, config.seed, step, micro, rank))  # dropout masks, replayable
        # Gradients are all-reduced once per optimizer step: on the last micro-batch only.
        with contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(run.model):
            losses = run.objective.losses(run.model, x0, noise, draws.timesteps, class_labels)
            if run.timestep_sampler.learns_from_losses:  # every process learns from the whole global batch
                run.timestep_sampler.update(draws.global_timesteps, accelerator.gather(losses.detach()))
            loss = (losses * draws.weights).mean() / accumulation  # importance weights keep the objective unbiased
            accelerator.backward(loss)
        step_loss += loss.detach()
        losses_by_t += binned_by_timestep(losses.detach(), draws.timesteps, config.ddpm_num_steps)
    # clip_grad_norm_ unscales fp16 gradients first; with clipping off it still measures the norm.
    grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), config.max_grad_norm or float("inf"))
    applied = apply_update(accelerator, run.optimizer, step_loss, grad_norm)
    run.lr_scheduler.step()  # the schedule follows the step count, applied or not
    run.optimizer.zero_grad(set_to_none=True)
    run.ema.update(run.unet.parameters(), applied)
    run.extra_emas.update(run.unet.parameters(), applied)
    return StepOutcome(step_loss, grad_norm.detach().float(), applied, draws.timesteps, losses_by_t)


TIMESTEP_BINS = 10  # the training loss per tenth of the chain, in every metrics row


def binned_by_timestep(losses: torch.Tensor, timesteps: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """(2, TIMESTEP_BINS): the sum of ``losses`` and their count in each equal bin of t, on the device."""
    bins = torch.div(timesteps * TIMESTEP_BINS, num_timesteps, rounding_mode="floor")
    sums = torch.zeros(2, TIMESTEP_BINS, device=losses.device)
    sums[0].index_add_(0, bins, losses.float())
    sums[1].index_add_(0, bins, torch.ones_like(losses, dtype=torch.float32))
    return sums


def apply_update(accelerator, optimizer, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Step the optimizer unless the loss or the gradient is non-finite; returns that flag on the device.

    Fused AdamW takes the flag itself (`found_inf`, the hook fp16's grad scaler uses) and leaves
    weights, moments and step count untouched when it is set, so the host never reads it. The
    foreach kernels cannot, so there the flag is read on the host, which waits for the device.
    Under fp16 the grad scaler skips non-finite gradients by itself; its skip is read on the host."""
    has_scaler = accelerator.scaler is not None
    finite = torch.isfinite(step_loss) if has_scaler else torch.isfinite(step_loss) & torch.isfinite(grad_norm)
    if has_scaler:
        if bool(finite):
            optimizer.step()
        return finite & (not accelerator.optimizer_step_was_skipped)
    if optimizer.optimizer.defaults.get("fused"):
        optimizer.optimizer.found_inf = (~finite).float()
        optimizer.step()
    elif bool(finite):
        optimizer.step()
    return finite


@dataclass
class IntervalSummary:
    mean_loss: float  # over applied steps and processes
    mean_grad_norm: float
    loss_by_t: list[float | None]  # the mean per-example loss in each tenth of 0..T-1 (None: not drawn), over processes
    steps: int  # applied and skipped
    seconds: float
    skipped: list[tuple[int, int, int]]  # (step, t min, t max) of each skipped step
    applied_flags: list[bool]  # per step, in order


class LoggingInterval:
    """Sums over the steps since the last log line, kept on the device so that no step waits for
    the host, and the time those steps took, excluding maintenance (grids, checkpoints). The
    non-finite guard's per-step flags are kept here too, and read once, at the logging step."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.losses_by_t = torch.zeros(2, TIMESTEP_BINS, device=device)
        self._restart()

    def _restart(self) -> None:
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.losses_by_t.zero_()
        self.step_numbers: list[int] = []
        self.outcomes: list[torch.Tensor] = []  # per step: (applied, t min, t max) on the device
        self.started, self.paused_seconds = time.perf_counter(), 0.0

    def add(self, step: int, outcome: StepOutcome) -> None:
        # where(), not multiplication: 0 * NaN would still be NaN.
        self.loss_sum += torch.where(outcome.applied, outcome.loss, 0.0)
        self.grad_norm_sum += torch.where(outcome.applied, outcome.grad_norm, 0.0)
        self.losses_by_t += torch.where(outcome.applied, outcome.losses_by_t, 0.0)
        self.step_numbers.append(step)
        t = outcome.timesteps
        self.outcomes.append(torch.stack([outcome.applied.to(t.dtype), t.min(), t.max()]))

    def running_seconds(self) -> float:
        """The optimisation time of this interval so far (call it outside ``paused``)."""
        return time.perf_counter() - self.started - self.paused_seconds

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count as optimisation time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - started

    def close(self, accelerator) -> IntervalSummary:
        """Read the interval from the device (the one wait of the interval) and start the next one.
        Skipped (non-finite) steps count in the time but not in the means."""
        seconds = max(self.running_seconds(), 1e-9)
        outcomes = torch.stack(self.outcomes).tolist() if self.outcomes else []
        applied = sum(int(flag) for flag, _, _ in outcomes)
        mean_loss = accelerator.reduce(self.loss_sum.clone(), reduction="mean").item() / applied if applied else float("nan")
        mean_grad_norm = self.grad_norm_sum.item() / applied if applied else float("nan")
        sums, counts = accelerator.reduce(self.losses_by_t.clone(), reduction="sum").tolist()
        summary = IntervalSummary(
            mean_loss=mean_loss, mean_grad_norm=mean_grad_norm, steps=len(outcomes), seconds=seconds,
            loss_by_t=[total / count if count else None for total, count in zip(sums, counts)],
            skipped=[(step, int(t_min), int(t_max)) for step, (flag, t_min, t_max) in zip(self.step_numbers, outcomes) if not flag],
            applied_flags=[bool(flag) for flag, _, _ in outcomes],
        )
        self._restart()
        return summary
