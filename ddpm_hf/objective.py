"""The DDPM training objective as pure functions of tensors (Ho et al. 2020, section 3).

Nothing here owns a model, an optimizer or a process group, so every identity can be tested
in isolation: the forward process q(x_t | x_0), the three regression targets that `diffusers`
schedulers understand, the per-timestep loss weights, the timestep samplers, and the per-example
loss of any network passed in, bundled with its settings in `DiffusionObjective`.

Symbols follow the paper: ``abar_t`` is alpha-bar_t = prod_{s<=t} (1 - beta_s), ``eps`` the
Gaussian noise, ``x0`` the clean image, ``x_t`` the noised one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

PredictionType = Literal["epsilon", "sample", "v_prediction"]
LossWeighting = Literal["simple", "snr", "min_snr", "vlb", "p2"]
TimestepSampling = Literal["uniform", "stratified"]  # the draws; resample.py wraps them (and loss_aware) as samplers


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor so it broadcasts over a (B, C, H, W) batch."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def q_sample(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. eq. 4).

    :param x0: clean images, (B, C, H, W) in [-1, 1].
    :param noise: eps ~ N(0, I), same shape as ``x0``.
    :param timesteps: integer t per example, (B,).
    :param alphas_cumprod: abar_t for t = 0..T-1, (T,), on the same device as ``x0``.
    """
    abar = alphas_cumprod[timesteps]
    return _per_example(abar.sqrt(), x0) * x0 + _per_example((1 - abar).sqrt(), x0) * noise


def training_target(
    x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """What the network regresses onto, in the convention `DDPMScheduler.step` reads it.

    - ``epsilon``: the noise eps (Ho et al. eq. 14).
    - ``sample``: the clean image x0.
    - ``v_prediction``: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans and Ho 2022, section 4).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        abar = alphas_cumprod[timesteps]
        return _per_example(abar.sqrt(), x0) * noise - _per_example((1 - abar).sqrt(), x0) * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predicted_x0(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
) -> torch.Tensor:
    """Invert the parametrisation: the x0 implied by a model output at x_t (as `DDPMScheduler.step` computes it)."""
    abar = _per_example(alphas_cumprod[timesteps], x_t)
    if prediction_type == "epsilon":
        return (x_t - (1 - abar).sqrt() * model_output) / abar.sqrt()
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return abar.sqrt() * x_t - (1 - abar).sqrt() * model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, eq. 1)."""
    abar = alphas_cumprod[timesteps]
    return abar / (1 - abar)


def vlb_x0_weights(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The weight of ||x0 - x0_hat||^2 (per dimension, in nats) in each term of the variational bound,
    for t = 0..T-1, with the reverse variance beta-tilde_t of DDPMScheduler's ``fixed_small``:

    - t >= 1: L_{t-1} = ||mu-tilde(x0) - mu-tilde(x0_hat)||^2 / (2 beta-tilde_t), which is
      (SNR(t-1) - SNR(t)) / 2 times the x0 error (Kingma et al. 2021, eq. 13, discrete time).
    - t = 0: the decoder's Gaussian around x0_hat with variance beta-tilde_1 (clipped, as in
      likelihood.py): 1 / (2 beta-tilde_1), the quadratic part of its negative log-likelihood.
    """
    abar = alphas_cumprod.double()
    ratio = abar / (1 - abar)
    beta_1 = 1 - abar[1] / abar[0]
    beta_tilde_1 = (1 - abar[0]) / (1 - abar[1]) * beta_1
    first = (0.5 / beta_tilde_1).reshape(1)
    return torch.cat([first, 0.5 * (ratio[:-1] - ratio[1:])]).to(alphas_cumprod.dtype)


def loss_weights(
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: PredictionType,
    weighting: LossWeighting,
    snr_gamma: float = 5.0,
    p2_k: float = 1.0,
    p2_gamma: float = 1.0,
) -> torch.Tensor:
    """Per-example weight on the MSE to the target, shape (B,).

    Every weighting is defined as a weight w(t) on the x0-space error ||x0 - x0_hat||^2 and
    converted to the chosen target, using ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and
    ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2:

    - ``simple``: weight 1 on the target's own MSE (Ho et al. L_simple, whatever the target).
    - ``snr``: w(t) = SNR(t), the x0-space weight that L_simple implies for eps-prediction,
      applied to any target: 1 for eps, SNR/(SNR + 1) for v, SNR for x0.
    - ``min_snr``: w(t) = min(SNR(t), gamma) (Hang et al. 2023): min(SNR, gamma)/SNR for eps,
      min(SNR, gamma)/(SNR + 1) for v, min(SNR, gamma) for x0.
    - ``vlb``: w(t) = the bound's own weight (`vlb_x0_weights`): the loss is then the term L_t of
      the variational bound in nats per dimension, so T times its mean over t is the bound
      (Ho et al. eq. 5; improved-diffusion's L_vlb). Its weights span orders of magnitude:
      pair it with --timestep_sampling loss_aware, as Nichol and Dhariwal 2021 do.
    - ``p2``: w(t) = SNR / (k + SNR)^gamma (Choi et al. 2022): L_simple's eps weight times
      (k + SNR)^-gamma, which turns down the high-SNR steps that only polish invisible detail.
    """
    if weighting == "simple":
        return torch.ones(timesteps.shape, dtype=alphas_cumprod.dtype, device=timesteps.device)
    ratio = snr(timesteps, alphas_cumprod)
    if weighting == "snr":
        x0_space_weight = ratio
    elif weighting == "min_snr":
        x0_space_weight = ratio.clamp(max=snr_gamma)
    elif weighting == "vlb":
        x0_space_weight = vlb_x0_weights(alphas_cumprod)[timesteps]
    elif weighting == "p2":
        x0_space_weight = ratio * (p2_k + ratio).pow(-p2_gamma)
    else:
        raise ValueError(f"unknown loss weighting {weighting!r}")
    if prediction_type == "epsilon":
        if weighting == "snr":
            return torch.ones_like(ratio)
        if weighting == "min_snr":  # min(SNR, gamma) / SNR written as min(1, gamma / SNR): no 0/0 where abar_t underflows
            return (snr_gamma / ratio).clamp(max=1.0)
        if weighting == "p2":
            return (p2_k + ratio).pow(-p2_gamma)
        return x0_space_weight / ratio
    if prediction_type == "v_prediction":
        return x0_space_weight / (ratio + 1)
    if prediction_type == "sample":
        return x0_space_weight
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def sample_timesteps(
    batch_size: int,
    num_train_timesteps: int,
    mode: TimestepSampling,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw one integer t in [0, T) per example.

    ``uniform``: t ~ U{0..T-1} independently (Ho et al. algorithm 1).
    ``stratified``: split [0, T) into ``batch_size`` equal slices and draw one t uniformly in
    each, then shuffle, so every batch covers the whole range: the same expectation as uniform
    with a lower-variance batch loss.
    """
    if mode == "uniform":
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=device)
    if mode == "stratified":
        offsets = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
        slices = torch.arange(batch_size, device=device, dtype=torch.float64)
        t = ((slices + offsets) * num_train_timesteps / batch_size).floor().long().clamp(max=num_train_timesteps - 1)
        return t[torch.randperm(batch_size, generator=generator, device=device)]
    raise ValueError(f"unknown timestep sampling {mode!r}")


def per_example_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted MSE per example, shape (B,): kept unreduced so callers can log or re-weight it."""
    squared_error = (model_output.float() - target.float()).pow(2)
    return squared_error.mean(dim=tuple(range(1, squared_error.ndim))) * weights.float()


@dataclass(frozen=True)
class DiffusionObjective:
    """The training loss with its settings: callers pass tensors, never the five settings again.

    :param alphas_cumprod: abar_t for t = 0..T-1, (T,), on the training device.
    :param prediction_type: the regression target.
    :param weighting: the per-timestep weight (see `loss_weights`).
    :param snr_gamma: gamma of min-SNR weighting.
    :param p2_k: k of P2 weighting.
    :param p2_gamma: gamma of P2 weighting.
    """

    alphas_cumprod: torch.Tensor
    prediction_type: PredictionType = "epsilon"
    weighting: LossWeighting = "simple"
    snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0

    @classmethod
    def from_config(cls, config, alphas_cumprod: torch.Tensor) -> "DiffusionObjective":
        return cls(alphas_cumprod, config.prediction_type, config.loss_weighting, config.snr_gamma, config.p2_k, config.p2_gamma)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def losses(self, model, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example weighted losses (B,) of ``model`` (a UNet2DModel or its wrapper) on one batch
        (Ho et al. algorithm 1, lines 2-5); ``class_labels`` only for a class-conditional UNet."""
        x_t, prediction = self._predict(model, x0, noise, timesteps, class_labels)
        return self._weighted(prediction, x0, noise, timesteps)

    def losses_and_eps_errors(self, model, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                              class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted losses and, from the same prediction, the unweighted MSE of the eps it implies:
        one scale on which runs of any target and weighting can be compared (eps-MSE equivalent)."""
        x_t, prediction = self._predict(model, x0, noise, timesteps, class_labels)
        if self.prediction_type == "epsilon":
            eps_hat = prediction
        else:
            x0_hat = predicted_x0(x_t.float(), prediction.float(), timesteps, self.alphas_cumprod.float(), self.prediction_type)
            abar = _per_example(self.alphas_cumprod[timesteps], x_t).float()
            eps_hat = (x_t.float() - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        eps_errors = per_example_loss(eps_hat, noise, torch.ones_like(timesteps, dtype=torch.float32))
        return self._weighted(prediction, x0, noise, timesteps), eps_errors

    def _predict(self, model, x0, noise, timesteps, class_labels):
        x_t = q_sample(x0, noise, timesteps, self.alphas_cumprod)
        extra = {} if class_labels is None else {"class_labels": class_labels}
        return x_t, model(x_t, timesteps, **extra).sample

    def _weighted(self, prediction, x0, noise, timesteps) -> torch.Tensor:
        target = training_target(x0, noise, timesteps, self.alphas_cumprod, self.prediction_type)
        weights = loss_weights(timesteps, self.alphas_cumprod, self.prediction_type, self.weighting, self.snr_gamma, self.p2_k, self.p2_gamma)
        return per_example_loss(prediction, target, weights)
