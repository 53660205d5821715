"""Bits per dimension: the variational bound of Ho et al. 2020 (eq. 5) on images, in bits.

    -log p(x0) <= L_T + sum_{t>1} L_{t-1} + L_0

- L_T = KL(q(x_T | x0) || N(0, I)): the prior term, free of the network.
- L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t = 1..T-1 (our 0-based t): two
  Gaussians, the true posterior and the network's reverse step with the scheduler's fixed variance.
- L_0 = -log p(x0 | x_1): the 8-bit discretised Gaussian decoder of Ho et al. section 3.3.

Divided by the number of dimensions and by ln 2 this is bits/dim on the 8-bit image, the figure
DDPM papers report (3.70 on CIFAR-10 for Ho et al.'s L_simple model). The computation follows
improved-diffusion's ``calc_bpd_loop``: timestep indices are diffusers' 0..T-1, the variance at
t = 0 is the clipped posterior variance, and one noise draw per (image, t).

Everything here is a pure function of tensors except `VariationalBound.terms`, which calls the
network once per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .objective import PredictionType, predicted_x0, q_sample

LN2 = math.log(2.0)
PIXEL_BIN = 2.0 / 255.0  # the width of one 8-bit level after scaling to [-1, 1]


def _mean_per_example(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=tuple(range(1, values.ndim)))


def gaussian_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^log_var1) || N(mean2, e^log_var2)) per element, in nats."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2) - 1.0)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """log P(x) per element, in nats, for x on the 256 levels of an 8-bit image scaled to [-1, 1],
    under N(mean, e^log_var) integrated over each level's bin; the end bins reach to -inf and +inf
    (Ho et al. eq. 13)."""
    inv_std = torch.exp(-0.5 * log_var)
    upper = (x - mean + PIXEL_BIN / 2) * inv_std
    lower = (x - mean - PIXEL_BIN / 2) * inv_std
    log_below_upper = torch.special.log_ndtr(upper)  # log Phi(upper): the whole bin of the lowest level
    log_above_lower = torch.special.log_ndtr(-lower)  # log (1 - Phi(lower)): the highest level
    # Phi(upper) - Phi(lower) for the levels in between, from whichever tail is more accurate.
    inner = torch.where(lower > 0, torch.special.ndtr(-lower) - torch.special.ndtr(-upper), torch.special.ndtr(upper) - torch.special.ndtr(lower))
    log_inner = torch.log(inner.clamp(min=1e-12))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_inner))


@dataclass(frozen=True)
class Schedule:
    """The quantities of the forward process and its posterior that the bound needs, in float64.

    :param alphas_cumprod: abar_t for t = 0..T-1.
    :param variance_type: the reverse step's fixed variance, as DDPMScheduler names it:
        ``fixed_small`` (the posterior variance beta-tilde_t, clipped at t = 0 to beta-tilde_1) or
        ``fixed_large`` (beta_t, with beta-tilde_1 at t = 0), Ho et al. section 3.2.
    """

    alphas_cumprod: torch.Tensor
    variance_type: str = "fixed_small"

    def __post_init__(self):
        if self.variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"bits/dim needs a fixed reverse variance (fixed_small or fixed_large), not {self.variance_type!r}")
        object.__setattr__(self, "alphas_cumprod", self.alphas_cumprod.detach().to(torch.float64))

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def to(self, device) -> "Schedule":
        return Schedule(self.alphas_cumprod.to(device), self.variance_type)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    @property
    def betas(self) -> torch.Tensor:
        return 1 - self.alphas_cumprod / self.alphas_cumprod_prev

    @property
    def posterior_variance(self) -> torch.Tensor:
        """beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (Ho et al. eq. 7); 0 at t = 0."""
        return (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod) * self.betas

    @property
    def posterior_log_variance(self) -> torch.Tensor:
        """log beta-tilde_t with t = 0 clipped to beta-tilde_1 (the true posterior at t = 0 is a point)."""
        variance = self.posterior_variance
        return torch.log(torch.cat([variance[1:2], variance[1:]]))

    @property
    def model_log_variance(self) -> torch.Tensor:
        if self.variance_type == "fixed_small":
            return self.posterior_log_variance
        return torch.log(torch.cat([self.posterior_variance[1:2], self.betas[1:]]))

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The mean of q(x_{t-1} | x_t, x0) (Ho et al. eq. 7)."""
        abar, abar_prev, beta = self.alphas_cumprod[timesteps], self.alphas_cumprod_prev[timesteps], self.betas[timesteps]
        coef_x0 = beta * abar_prev.sqrt() / (1 - abar)
        coef_xt = (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)
        return _broadcast(coef_x0, x0) * x0 + _broadcast(coef_xt, x_t) * x_t

    def prior_bits(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T per example, in bits/dim: KL(q(x_T | x0) || N(0, I))."""
        abar_last = self.alphas_cumprod[-1]
        x0 = x0.to(torch.float64)
        mean, log_var = abar_last.sqrt() * x0, torch.log(1 - abar_last).expand_as(x0)
        return _mean_per_example(gaussian_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0))) / LN2

    def term_bits(self, x0: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        """L_t per example in bits/dim, given the network's x0 estimate at x_t: the decoder NLL at
        t = 0, the KL between the true and the model's reverse step elsewhere."""
        x0, x_t, x0_hat = (v.to(torch.float64) for v in (x0, x_t, x0_hat))
        true_mean = self.posterior_mean(x0, x_t, timesteps)
        model_mean = self.posterior_mean(x0_hat, x_t, timesteps)
        true_log_var = _broadcast(self.posterior_log_variance[timesteps], x0).expand_as(x0)
        model_log_var = _broadcast(self.model_log_variance[timesteps], x0).expand_as(x0)
        kl = _mean_per_example(gaussian_kl(true_mean, true_log_var, model_mean, model_log_var)) / LN2
        decoder_nll = -_mean_per_example(discretized_gaussian_log_likelihood(x0, model_mean, model_log_var)) / LN2
        return torch.where(timesteps == 0, decoder_nll, kl)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def stratified_timesteps(num_images: int, num_timesteps: int, per_image: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K = ``per_image`` timesteps per image, one drawn uniformly from each of K contiguous slices of
    0..T-1, and the size of each slice: sum_k size_k L_{t_k} is an unbiased estimate of sum_t L_t.

    The slices grow geometrically (edge k near T^(k/K), each at least one step wide): the terms are
    largest and change fastest near t = 0 (the decoder term alone is about half the bound of a
    trained model), so the first slices are single steps, computed exactly, and the long flat tail
    is sampled sparsely. Equal slices would multiply the decoder term by T/K in one draw in K.
    Returns (timesteps (N, K), sizes (K,))."""
    if not 1 <= per_image <= num_timesteps:
        raise ValueError(f"the timesteps per image must be in 1..{num_timesteps}, got {per_image}")
    edges = [0]
    for k in range(1, per_image + 1):
        room = num_timesteps - (per_image - k)  # leave one step for each slice still to come
        edges.append(min(max(edges[-1] + 1, round(num_timesteps ** (k / per_image))), room))
    edges = torch.tensor(edges)
    sizes = edges[1:] - edges[:-1]
    offsets = (torch.rand(num_images, per_image, generator=generator, dtype=torch.float64) * sizes).floor().long()
    return edges[:-1] + offsets, sizes


@dataclass(frozen=True)
class VariationalBound:
    """The bound for one network: its schedule, target type and whether x0 is clipped to [-1, 1]
    before the reverse mean (as the scheduler's ``clip_sample`` does when sampling)."""

    schedule: Schedule
    prediction_type: PredictionType = "epsilon"
    clip_sample: bool = True

    @classmethod
    def from_scheduler_config(cls, scheduler_config) -> "VariationalBound":
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(scheduler_config)
        config = scheduler.config
        return cls(Schedule(scheduler.alphas_cumprod, config.variance_type), config.prediction_type,
                   bool(config.clip_sample) and config.clip_sample_range == 1.0)

    @torch.no_grad()
    def terms(self, unet, x0: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """L_t in bits/dim for each example at its own t (one network call), shape (B,)."""
        alphas_cumprod = self.schedule.alphas_cumprod.to(device=x0.device, dtype=torch.float32)
        x_t = q_sample(x0, noise, timesteps, alphas_cumprod)
        extra = {} if class_labels is None else {"class_labels": class_labels}
        output = unet(x_t, timesteps, **extra).sample
        schedule = self.schedule.to(x0.device)
        x0_hat = predicted_x0(x_t.double(), output.double(), timesteps, schedule.alphas_cumprod, self.prediction_type)
        if self.clip_sample:
            x0_hat = x0_hat.clamp(-1, 1)
        return schedule.term_bits(x0, x_t, timesteps, x0_hat)


# ----------------------------------------------------------------------------------------------
# The measurement over a set of images
# ----------------------------------------------------------------------------------------------
@dataclass
class BitsPerDim:
    """The bound on a set of images: its mean over images in bits/dim, the standard error of that
    mean (over images, and over the drawn timesteps for an estimate), and the mean L_t per t."""

    bits_per_dim: float
    std_error: float
    prior_bits_per_dim: float
    num_images: int
    timesteps_per_image: int
    exact: bool
    per_timestep: list[dict]  # {"t", "bits_per_dim", "std_error", "count"} for every t drawn at least once

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "per_timestep"}


def measure_bits_per_dim(bound: VariationalBound, unet, images: torch.Tensor, labels: torch.Tensor | None = None,
                         timesteps_per_image: int | None = None, batch_size: int = 64, seed: int = 0, progress: bool = True) -> BitsPerDim:
    """The bound of ``unet`` on ``images`` (N, C, H, W) in [-1, 1], exact (all T terms per image) or
    estimated from ``timesteps_per_image`` = K stratified terms per image.

    The noise of image i's term at t is a function of (seed, i, t) alone, so the estimate draws a
    subset of exactly the terms the exact computation sums: with K = T they coincide."""
    from tqdm.auto import tqdm

    from .seeds import Stream, generator

    num_images, T = len(images), bound.schedule.num_timesteps
    exact = timesteps_per_image is None or timesteps_per_image == T
    if exact:
        timesteps, sizes = torch.arange(T).expand(num_images, T), torch.ones(T, dtype=torch.long)
    else:
        timesteps, sizes = stratified_timesteps(num_images, T, timesteps_per_image, generator(Stream.LIKELIHOOD_TIMESTEPS, seed))
    K = timesteps.shape[1]
    device = images.device
    terms = torch.zeros(num_images, K, dtype=torch.float64)
    bar = tqdm(total=num_images * K, desc=f"bits/dim ({'all' if exact else K} terms per image)", unit="term", disable=not progress)
    for start in range(0, num_images, batch_size):
        x0 = images[start:start + batch_size]
        batch_labels = None if labels is None else labels[start:start + batch_size]
        for k in range(K):
            t = timesteps[start:start + len(x0), k]
            noise = torch.stack([torch.randn(x0.shape[1:], generator=generator(Stream.LIKELIHOOD_NOISE, seed, start + i, int(t_i)))
                                 for i, t_i in enumerate(t)]).to(device)
            terms[start:start + len(x0), k] = bound.terms(unet, x0, t.to(device), noise, batch_labels).cpu()
            bar.update(len(x0))
    bar.close()
    prior = bound.schedule.prior_bits(images).cpu()
    per_image = (terms * sizes).sum(dim=1) + prior
    return BitsPerDim(
        bits_per_dim=per_image.mean().item(),
        std_error=(per_image.std() / math.sqrt(num_images)).item() if num_images > 1 else float("nan"),
        prior_bits_per_dim=prior.mean().item(),
        num_images=num_images,
        timesteps_per_image=K,
        exact=exact,
        per_timestep=_per_timestep(terms, timesteps, T),
    )


def _per_timestep(terms: torch.Tensor, timesteps: torch.Tensor, T: int) -> list[dict]:
    """Mean and standard error of L_t over the images where t was drawn."""
    flat_t, flat = timesteps.reshape(-1), terms.reshape(-1)
    count = torch.zeros(T, dtype=torch.float64).index_add_(0, flat_t, torch.ones_like(flat))
    total = torch.zeros(T, dtype=torch.float64).index_add_(0, flat_t, flat)
    squares = torch.zeros(T, dtype=torch.float64).index_add_(0, flat_t, flat ** 2)
    rows = []
    for t in torch.nonzero(count).flatten().tolist():
        n, mean = count[t].item(), (total[t] / count[t]).item()
        variance = max(squares[t].item() / n - mean ** 2, 0.0) * n / (n - 1) if n > 1 else float("nan")
        rows.append({"t": t, "bits_per_dim": mean, "std_error": math.sqrt(variance / n), "count": int(n)})
    return rows
