"""Bits/dim against closed forms: Gaussian KLs, the discretised decoder, the prior term, and the
whole bound on Gaussian data with its exact denoiser, where every term is computable by hand."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ddpm_hf.likelihood import (BitsPerDim, Schedule, VariationalBound, discretized_gaussian_log_likelihood, gaussian_kl, measure_bits_per_dim,
                                stratified_timesteps)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _linear_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    """abar_t of DDPMScheduler's default linear schedule, written out independently (Ho et al. 2020)."""
    betas = np.linspace(1e-4, 0.02, T)
    return torch.tensor(np.cumprod(1 - betas))


def test_gaussian_kl_matches_hand_values():
    zero, one = torch.tensor(0.0), torch.tensor(1.0)
    assert gaussian_kl(zero, zero, one, zero).item() == pytest.approx(0.5)  # unit variances, means 1 apart
    assert gaussian_kl(zero, torch.tensor(math.log(2)), zero, zero).item() == pytest.approx(0.5 * (2 - 1 - math.log(2)))
    assert gaussian_kl(one, zero, one, zero).item() == 0.0


def test_discretised_decoder_integrates_each_bin_and_sums_to_one():
    std = 0.01
    x = torch.tensor([127 * 2 / 255 - 1, -1.0, 1.0], dtype=torch.float64)  # a middle level and the two ends
    log_p = discretized_gaussian_log_likelihood(x, x.clone(), torch.full_like(x, 2 * math.log(std)))
    half_bin = 1 / 255 / std
    assert log_p[0].item() == pytest.approx(math.log(_phi(half_bin) - _phi(-half_bin)), rel=1e-9)
    assert log_p[1].item() == pytest.approx(math.log(_phi(half_bin)), rel=1e-9)  # the lowest bin reaches to -inf
    assert log_p[2].item() == pytest.approx(math.log(1 - _phi(-half_bin)), rel=1e-9)
    # Over all 256 levels the probabilities of one Gaussian sum to one, whatever its mean and width.
    levels = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1
    for mean, log_var in ((0.3, math.log(0.05 ** 2)), (-0.98, math.log(0.002 ** 2)), (0.0, 0.0)):
        p = discretized_gaussian_log_likelihood(levels, torch.full_like(levels, mean), torch.full_like(levels, log_var)).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_prior_term_is_the_kl_of_the_last_marginal_from_the_standard_normal():
    abar = _linear_alphas_cumprod()
    schedule = Schedule(abar)
    x0 = torch.tensor([[[[0.0, 0.5], [-1.0, 1.0]]]], dtype=torch.float64)
    a = abar[-1].item()
    by_hand = np.mean([0.5 * (a * v ** 2 + (1 - a) - 1 - math.log(1 - a)) for v in (0.0, 0.5, -1.0, 1.0)]) / math.log(2)
    assert schedule.prior_bits(x0).item() == pytest.approx(by_hand, rel=1e-9)
    assert by_hand < 1e-4  # the linear schedule ends close to N(0, I): the prior term is tiny


def test_posterior_variance_and_clipping_follow_ho_et_al():
    abar = _linear_alphas_cumprod()
    schedule = Schedule(abar)
    beta = np.linspace(1e-4, 0.02, 1000)
    abar_np = abar.numpy()
    for t in (1, 2, 500, 999):
        assert schedule.posterior_variance[t].item() == pytest.approx((1 - abar_np[t - 1]) / (1 - abar_np[t]) * beta[t], rel=1e-9)
    assert schedule.posterior_variance[0].item() == 0.0
    assert schedule.posterior_log_variance[0].item() == pytest.approx(math.log((1 - abar_np[0]) / (1 - abar_np[1]) * beta[1]), rel=1e-9)
    assert Schedule(abar, "fixed_large").model_log_variance[500].item() == pytest.approx(math.log(beta[500]), rel=1e-9)


class ExactGaussianDenoiser(torch.nn.Module):
    """For data x0 ~ N(0, s^2 I) the best x0 estimate at x_t is E[x0 | x_t] = sqrt(abar) s^2 x_t / (abar s^2 + 1 - abar);
    this network returns the eps that implies it."""

    def __init__(self, alphas_cumprod: torch.Tensor, data_std: float):
        super().__init__()
        self.alphas_cumprod, self.variance = alphas_cumprod, data_std ** 2

    def forward(self, x_t, timesteps, **_):
        abar = self.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1).to(x_t.dtype)
        x0_hat = abar.sqrt() * self.variance * x_t / (abar * self.variance + 1 - abar)
        return SimpleNamespace(sample=(x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt())


def test_each_kl_term_on_gaussian_data_with_its_exact_denoiser_matches_the_closed_form():
    abar = _linear_alphas_cumprod()
    s = 0.5
    bound = VariationalBound(Schedule(abar), "epsilon", clip_sample=False)
    denoiser = ExactGaussianDenoiser(abar.float(), s)
    x0 = torch.randn(64, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * s
    beta = np.linspace(1e-4, 0.02, 1000)
    a = abar.numpy()
    for t in (1, 10, 200, 999):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        measured = bound.terms(denoiser, x0, torch.full((64,), t), noise).mean().item()
        # Same variance on both sides, so the KL is the squared mean gap over 2 beta-tilde_t; the gap is
        # coef_x0 (x0 - E[x0 | x_t]), whose mean square is coef_x0^2 times the posterior variance of x0.
        coef_x0 = beta[t] * math.sqrt(a[t - 1]) / (1 - a[t])
        posterior_var_x0 = s ** 2 * (1 - a[t]) / (a[t] * s ** 2 + 1 - a[t])
        beta_tilde = (1 - a[t - 1]) / (1 - a[t]) * beta[t]
        closed_form = coef_x0 ** 2 * posterior_var_x0 / (2 * beta_tilde) / math.log(2)
        assert measured == pytest.approx(closed_form, rel=0.03), t


def _random_unet_and_images(T: int = 40):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    scheduler = DDPMScheduler(num_train_timesteps=T)
    levels = torch.randint(0, 256, (12, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    return unet, VariationalBound.from_scheduler_config(scheduler.config), levels.float() * 2 / 255 - 1


def test_the_estimate_with_every_timestep_is_the_exact_sum_and_fewer_agree_within_their_error():
    unet, bound, images = _random_unet_and_images()
    exact = measure_bits_per_dim(bound, unet, images, batch_size=5, progress=False)
    assert exact.exact and exact.timesteps_per_image == 40 and len(exact.per_timestep) == 40
    assert exact.bits_per_dim == pytest.approx(sum(r["bits_per_dim"] for r in exact.per_timestep) + exact.prior_bits_per_dim, rel=1e-9)
    everything = measure_bits_per_dim(bound, unet, images, timesteps_per_image=40, batch_size=7, progress=False)
    assert everything.bits_per_dim == pytest.approx(exact.bits_per_dim, rel=1e-7)  # the same terms; float32 batches of 7, not 5
    for k in (4, 10):
        estimate = measure_bits_per_dim(bound, unet, images, timesteps_per_image=k, seed=3, progress=False)
        assert not estimate.exact and estimate.timesteps_per_image == k
        assert abs(estimate.bits_per_dim - exact.bits_per_dim) < 3 * estimate.std_error, (k, estimate, exact.bits_per_dim)


def test_stratified_timesteps_cover_each_slice_once_and_weight_it_by_its_size():
    t, sizes = stratified_timesteps(500, 10, 4, torch.Generator().manual_seed(0))
    assert sizes.tolist() == [2, 1, 3, 4]  # edges 0, 2, 3, 6, 10: near 10^(k/4) = 1.8, 3.2, 5.6, 10
    assert t[:, 0].unique().tolist() == [0, 1] and t[:, 1].unique().tolist() == [2]
    assert t[:, 2].unique().tolist() == [3, 4, 5] and t[:, 3].unique().tolist() == [6, 7, 8, 9]
    _, sizes = stratified_timesteps(1, 1000, 50)
    assert sizes[:22].tolist() == [1] * 22 and sizes.sum().item() == 1000 and sizes[-1].item() == 1000 - 871  # 1000^(49/50) = 870.96
    _, sizes = stratified_timesteps(1, 10, 10)
    assert sizes.tolist() == [1] * 10  # K = T: every term once
    with pytest.raises(ValueError, match="1..10"):
        stratified_timesteps(1, 10, 11)


def test_a_learned_variance_is_refused():
    with pytest.raises(ValueError, match="fixed reverse variance"):
        Schedule(_linear_alphas_cumprod(), "learned_range")
