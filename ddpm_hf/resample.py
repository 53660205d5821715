"""Timestep samplers: one interface for every way of choosing t, as in improved-diffusion.

Each sampler draws (t, weights) for a batch, where the weights make the draw unbiased for the
uniform objective: E_{t~p}[w_t L_t] = (1/T) sum_t L_t. Uniform and stratified draws have weight 1.

The loss-aware sampler follows improved-diffusion's `LossSecondMomentResampler` (Nichol and
Dhariwal 2021, section 3.3): keep the last ``history`` losses seen at each timestep; once every
timestep has a full history, draw t with probability p_t proportional to sqrt(E[L_t^2]), mixed
with a small uniform share so that no timestep is starved, with weight 1 / (T p_t).

Every process feeds a learning sampler the losses of the whole global batch (gathered), so all
ranks hold the same history and draw from the same distribution.
"""

from __future__ import annotations

import math

import torch

from .objective import TimestepSampling, sample_timesteps


class TimestepSampler:
    """The interface. ``draws_on_host``: its generator must be a CPU one (its probabilities live
    there). ``learns_from_losses``: the training step passes it every global batch's losses."""

    draws_on_host = False
    learns_from_losses = False

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weights) for ``batch_size`` examples, on the generator's device."""
        raise NotImplementedError

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Learn from the losses seen at ``timesteps`` (only samplers that learn_from_losses)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class _FixedDistributionSampler(TimestepSampler):
    mode: TimestepSampling

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = sample_timesteps(batch_size, self.num_timesteps, self.mode, generator, generator.device)
        return timesteps, torch.ones(batch_size, device=generator.device)


class UniformSampler(_FixedDistributionSampler):
    """t ~ U{0..T-1} independently (Ho et al. algorithm 1)."""

    mode = "uniform"


class StratifiedSampler(_FixedDistributionSampler):
    """One t per equal slice of [0, T), shuffled: the uniform expectation with less batch variance."""

    mode = "stratified"


class LossSecondMomentSampler(TimestepSampler):
    """Timestep sampler with importance weights; its state goes into every checkpoint.

    :param num_timesteps: T.
    :param history: losses remembered per timestep (10 in improved-diffusion).
    :param uniform_prob: the share of probability spread uniformly, a floor of uniform_prob / T per t.
    """

    draws_on_host = True
    learns_from_losses = True

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        # float64 on the host: the update is a handful of scalar writes per example.
        self.losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    @property
    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t for t = 0..T-1: uniform until every timestep has a full history."""
        if not self.warmed_up:
            return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        second_moment = self.losses.pow(2).mean(dim=1).sqrt()
        if not second_moment.sum() > 0:  # every remembered loss is zero: nothing to prefer
            return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        p = second_moment / second_moment.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weights) for ``batch_size`` examples: t ~ p, weight 1 / (T p_t), on the host."""
        p = self.probabilities()
        timesteps = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[timesteps])
        return timesteps, weights.float()

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Remember one loss per (t, loss) pair, in batch order; non-finite losses are not remembered."""
        history, counts = self.losses.numpy(), self.counts.numpy()  # views: element writes at numpy speed
        for t, loss in zip(timesteps.cpu().tolist(), losses.double().cpu().tolist()):
            if not math.isfinite(loss):
                continue
            if counts[t] == self.history:  # full: drop the oldest
                history[t, :-1] = history[t, 1:].copy()
                history[t, -1] = loss
            else:
                history[t, counts[t]] = loss
                counts[t] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # a checkpoint from a run that sampled t another way: start a fresh history
            return
        if state["losses"].shape != self.losses.shape:
            raise ValueError(f"loss-aware sampler state has shape {tuple(state['losses'].shape)}, expected {tuple(self.losses.shape)}")
        self.losses = state["losses"].clone().double()
        self.counts = state["counts"].clone().long()


SAMPLERS = {"uniform": UniformSampler, "stratified": StratifiedSampler, "loss_aware": LossSecondMomentSampler}


def make_timestep_sampler(mode: str, num_timesteps: int) -> TimestepSampler:
    """The sampler that --timestep_sampling names."""
    if mode not in SAMPLERS:
        raise ValueError(f"unknown timestep sampling {mode!r}")
    return SAMPLERS[mode](num_timesteps)
