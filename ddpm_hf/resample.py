"""Loss-aware timestep sampling: draw t where the loss is large, weight it back to stay unbiased.

The design of improved-diffusion's `LossSecondMomentResampler` (Nichol and Dhariwal 2021,
section 3.3): keep the last ``history`` losses seen at each timestep; once every timestep has a
full history, draw t with probability p_t proportional to sqrt(E[L_t^2]), mixed with a small
uniform share so that no timestep is starved. Each example's loss is multiplied by
1 / (T p_t), so E_{t~p}[L_t / (T p_t)] = (1/T) sum_t L_t: the same objective as uniform
sampling, estimated with less variance.

Every process feeds the sampler the losses of the whole global batch (gathered), so all ranks
hold the same history and draw from the same distribution.
"""

from __future__ import annotations

import math

import torch


class LossSecondMomentSampler:
    """Timestep sampler with importance weights; its state goes into every checkpoint.

    :param num_timesteps: T.
    :param history: losses remembered per timestep (10 in improved-diffusion).
    :param uniform_prob: the share of probability spread uniformly, a floor of uniform_prob / T per t.
    """

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = num_timesteps
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

    def sample(self, batch_size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weights) for ``batch_size`` examples: t ~ p, weight 1 / (T p_t)."""
        p = self.probabilities()
        timesteps = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[timesteps])
        return timesteps.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Remember one loss per (t, loss) pair, in batch order; non-finite losses are not remembered."""
        history, counts = self.losses.numpy(), self.counts.numpy()  # views: element writes at numpy speed
        for t, loss in zip(timesteps.tolist(), losses.double().tolist()):
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
