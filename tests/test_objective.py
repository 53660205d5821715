"""The maths of ddpm_hf.objective against closed forms, golden values and diffusers' DDPMScheduler."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ddpm_hf.config import TrainingConfig
from ddpm_hf.models import build_noise_scheduler
from ddpm_hf.objective import (
    DiffusionObjective,
    loss_weights,
    per_example_loss,
    predicted_x0,
    q_sample,
    sample_timesteps,
    snr,
    training_target,
)

PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]


def linear_abar() -> torch.Tensor:
    return build_noise_scheduler(TrainingConfig()).alphas_cumprod


# ----- schedules -----
def test_linear_schedule_golden_values():
    scheduler = build_noise_scheduler(TrainingConfig())
    assert scheduler.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert scheduler.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    abar = scheduler.alphas_cumprod.double()
    # Ho et al.'s linear schedule: abar_T = prod(1 - beta_t) ~ 4.04e-5, so x_T is almost pure noise.
    assert abar[-1].item() == pytest.approx(4.0358e-05, rel=1e-3)
    assert abar[499].item() == pytest.approx(0.0785872, rel=1e-4)
    expected = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(abar.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_every_schedule_is_a_valid_diffusion(schedule):
    abar = build_noise_scheduler(TrainingConfig(ddpm_beta_schedule=schedule)).alphas_cumprod.double()
    assert len(abar) == 1000
    assert torch.all(abar[1:] < abar[:-1]), "abar_t must fall strictly with t"
    assert 0.98 < abar[0] < 1 and abar[-1] < 0.01


def test_cosine_schedule_matches_nichol_dhariwal_formula():
    abar = build_noise_scheduler(TrainingConfig(ddpm_beta_schedule="squaredcos_cap_v2")).alphas_cumprod.double().numpy()
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.minimum([1 - f(t + 1) / f(t) for t in range(1000)], 0.999)
    np.testing.assert_allclose(abar, np.cumprod(1 - betas), rtol=1e-4)


# ----- forward process -----
def test_q_sample_has_the_closed_form_mean_and_variance():
    abar = linear_abar()
    torch.manual_seed(0)
    for t in [0, 250, 999]:
        x0 = torch.full((20000, 1, 1, 1), 0.7)
        x_t = q_sample(x0, torch.randn_like(x0), torch.full((20000,), t), abar)
        assert x_t.mean().item() == pytest.approx(math.sqrt(abar[t]) * 0.7, abs=0.02)
        assert x_t.var().item() == pytest.approx(1 - abar[t].item(), abs=0.02)


def test_q_sample_equals_diffusers_add_noise():
    scheduler = DDPMScheduler()
    x0, noise = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.testing.assert_close(q_sample(x0, noise, t, scheduler.alphas_cumprod), scheduler.add_noise(x0, noise, t))


# ----- targets -----
def test_v_target_equals_diffusers_get_velocity():
    scheduler = DDPMScheduler()
    x0, noise = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    t = torch.tensor([0, 100, 400, 700, 999])
    torch.testing.assert_close(training_target(x0, noise, t, scheduler.alphas_cumprod, "v_prediction"), scheduler.get_velocity(x0, noise, t))


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_a_perfect_prediction_gives_back_x0_in_ddpm_step(prediction_type):
    """The target we regress onto is read by DDPMScheduler.step as the true x0."""
    scheduler = DDPMScheduler(prediction_type=prediction_type, clip_sample=False)
    x0, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    for t in [1, 50, 500, 999]:
        timesteps = torch.full((2,), t)
        x_t = q_sample(x0, noise, timesteps, scheduler.alphas_cumprod)
        target = training_target(x0, noise, timesteps, scheduler.alphas_cumprod, prediction_type)
        recovered = scheduler.step(target, t, x_t).pred_original_sample
        torch.testing.assert_close(recovered, x0, atol=2e-3 if t == 999 else 1e-4, rtol=0)
        torch.testing.assert_close(predicted_x0(x_t, target, timesteps, scheduler.alphas_cumprod, prediction_type), x0, atol=2e-3 if t == 999 else 1e-4, rtol=0)


# ----- loss weights -----
def test_simple_weighting_is_one():
    t = torch.arange(0, 1000, 111)
    for prediction_type in PREDICTION_TYPES:
        assert torch.all(loss_weights(t, linear_abar(), prediction_type, "simple") == 1)


def test_min_snr_weights_follow_hang_et_al():
    abar = linear_abar().double()
    t = torch.arange(0, 1000, 37)
    ratio = abar[t] / (1 - abar[t])
    gamma = 5.0
    clamped = torch.minimum(ratio, torch.tensor(gamma, dtype=torch.float64))
    torch.testing.assert_close(loss_weights(t, abar, "epsilon", "min_snr", gamma), clamped / ratio)
    torch.testing.assert_close(loss_weights(t, abar, "v_prediction", "min_snr", gamma), clamped / (ratio + 1))
    torch.testing.assert_close(loss_weights(t, abar, "sample", "min_snr", gamma), clamped)
    # High-noise steps keep full weight for eps; low-noise steps are capped.
    assert loss_weights(torch.tensor([999]), abar, "epsilon", "min_snr")[0] == 1
    assert loss_weights(torch.tensor([0]), abar, "epsilon", "min_snr")[0] < 0.01


def test_vlb_weights_are_half_the_snr_drop_and_the_decoder_width():
    """Fixed values of the linear schedule: w(t) = (SNR(t-1) - SNR(t)) / 2 for t >= 1, and 1 / (2 beta-tilde_1) at t = 0."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    ratio = abar / (1 - abar)
    weights = loss_weights(torch.tensor([0, 1, 10, 500, 999]), torch.tensor(abar), "sample", "vlb").tolist()
    beta_tilde_1 = (1 - abar[0]) / (1 - abar[1]) * betas[1]
    expected = [0.5 / beta_tilde_1] + [0.5 * (ratio[t - 1] - ratio[t]) for t in (1, 10, 500, 999)]
    assert weights == pytest.approx(expected, rel=1e-9)
    # By hand: beta_0 = 1e-4, beta_1 = 1.1992e-4, abar_0 = 0.9999, abar_1 = 0.99978, beta-tilde_1 = 5.4532e-5.
    assert weights[0] == pytest.approx(9168.95, rel=1e-5) and weights[1] == pytest.approx(2726.32, rel=1e-5)
    # eps-prediction: the same terms divided by SNR(t); far smaller where the signal is gone.
    eps = loss_weights(torch.tensor([1, 999]), torch.tensor(abar), "epsilon", "vlb").tolist()
    assert eps == pytest.approx([0.5 * (ratio[0] / ratio[1] - 1), 0.5 * (ratio[998] / ratio[999] - 1)], rel=1e-9)


def test_vlb_weighted_x0_error_is_the_bound_term_of_likelihood_py():
    """The vlb-weighted loss is the KL term L_t that bits/dim sums (in nats rather than bits)."""
    from ddpm_hf.likelihood import LN2, Schedule

    abar = linear_abar().double()
    t = torch.tensor([1, 7, 250, 800])
    x0 = torch.rand(4, 1, 6, 6, dtype=torch.float64) * 2 - 1
    x_t = q_sample(x0, torch.randn_like(x0), t, abar)
    x0_hat = x0 + 0.05 * torch.randn_like(x0)
    weighted = per_example_loss(x0_hat, x0, loss_weights(t, abar, "sample", "vlb")).double()
    torch.testing.assert_close(weighted / LN2, Schedule(abar).term_bits(x0, x_t, t, x0_hat), rtol=1e-6, atol=0)


def test_p2_weights_follow_choi_et_al():
    abar = linear_abar().double()
    t = torch.arange(0, 1000, 53)
    ratio = abar[t] / (1 - abar[t])
    torch.testing.assert_close(loss_weights(t, abar, "epsilon", "p2"), 1 / (1 + ratio))  # k = 1, gamma = 1
    torch.testing.assert_close(loss_weights(t, abar, "epsilon", "p2", p2_k=2.0, p2_gamma=0.5), (2 + ratio) ** -0.5)
    torch.testing.assert_close(loss_weights(t, abar, "sample", "p2", p2_k=2.0, p2_gamma=0.5), ratio * (2 + ratio) ** -0.5)
    assert loss_weights(torch.tensor([0]), abar, "epsilon", "p2").item() == pytest.approx(1 / (1 + 9999), rel=1e-3)  # SNR(0) = 0.9999 / 1e-4
    assert loss_weights(torch.tensor([0, 999]), abar, "epsilon", "p2", p2_gamma=0.0).tolist() == [1.0, 1.0]  # gamma 0 is L_simple


@pytest.mark.parametrize("weighting", ["simple", "snr", "min_snr", "vlb", "p2"])
def test_weighted_losses_agree_across_parametrisations(weighting):
    """snr, min_snr, vlb and p2 are each one x0-space weight w(t): the weighted eps, v and x0 losses are equal
    for the same implied x0 prediction. (simple is per-target by design, so only checked for eps.)"""
    abar = linear_abar().double()
    t = torch.tensor([3, 90, 300, 600, 950])
    x0, noise = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randn(5, 1, 4, 4, dtype=torch.float64)
    x_t = q_sample(x0, noise, t, abar)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    a = abar[t].reshape(-1, 1, 1, 1)
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    outputs = {"sample": x0_hat, "epsilon": eps_hat, "v_prediction": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat}
    losses = {
        p: per_example_loss(outputs[p], training_target(x0, noise, t, abar, p), loss_weights(t, abar, p, weighting)).double()
        for p in PREDICTION_TYPES
    }
    if weighting == "simple":
        x0_error = (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(losses["epsilon"], snr(t, abar) * x0_error, rtol=1e-4, atol=0)
    else:
        torch.testing.assert_close(losses["epsilon"], losses["sample"], rtol=1e-4, atol=0)
        torch.testing.assert_close(losses["v_prediction"], losses["sample"], rtol=1e-4, atol=0)


def test_per_example_loss_stays_unreduced():
    prediction, target = torch.zeros(3, 1, 2, 2), torch.stack([torch.full((1, 2, 2), v) for v in (0.0, 1.0, 2.0)])
    losses = per_example_loss(prediction, target, torch.tensor([1.0, 1.0, 0.5]))
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, torch.tensor([0.0, 1.0, 2.0]))


# ----- timestep samplers -----
def test_uniform_timesteps_cover_the_range():
    t = sample_timesteps(100_000, 1000, "uniform", torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 999
    assert t.float().mean().item() == pytest.approx(499.5, abs=3)


def test_stratified_timesteps_draw_one_per_slice():
    for seed in range(5):
        t = sample_timesteps(10, 1000, "stratified", torch.Generator().manual_seed(seed))
        assert sorted((t // 100).tolist()) == list(range(10))
    batch_means = [sample_timesteps(16, 1000, "stratified", torch.Generator().manual_seed(s)).float().mean() for s in range(200)]
    uniform_means = [sample_timesteps(16, 1000, "uniform", torch.Generator().manual_seed(s)).float().mean() for s in range(200)]
    assert torch.stack(batch_means).std() < 0.2 * torch.stack(uniform_means).std()
    assert torch.stack(batch_means).mean().item() == pytest.approx(499.5, abs=5)


def test_smoothing_follows_the_end_of_a_short_run():
    from ddpm_hf.metrics import smooth

    values = [1.0] * 5 + [0.1] * 20  # a fast early drop, then flat
    assert smooth(values)[-1] == pytest.approx(0.1, abs=0.01)
    assert smooth([2.0, 4.0], weight=0.5) == pytest.approx([2.0, (0.5 * 1.0 + 0.5 * 4.0) / 0.75])  # bias-corrected
    assert smooth([3.0] * 500)[-1] == pytest.approx(3.0)


# ----- the objective object -----
class _ZeroNetwork(torch.nn.Module):
    """Predicts 0 everywhere, like a UNet2DModel's output (``.sample``); records what it was called with."""

    def forward(self, x_t, timesteps, class_labels=None):
        self.seen = (x_t, timesteps, class_labels)
        return type("Output", (), {"sample": torch.zeros_like(x_t)})()


def test_the_objective_computes_the_weighted_loss_of_its_settings():
    # A network that predicts 0 makes the loss the weighted mean square of the target, in closed form.
    abar = linear_abar()
    t = torch.tensor([10, 500, 990])
    x0, noise = torch.full((3, 1, 2, 2), 0.5), torch.full((3, 1, 2, 2), 2.0)
    network = _ZeroNetwork()
    x0_min_snr = DiffusionObjective(abar, "sample", "min_snr", snr_gamma=5.0)
    expected = 0.25 * snr(t, abar).clamp(max=5.0)  # mean(x0²) = 0.25, weight min(SNR, 5)
    torch.testing.assert_close(x0_min_snr.losses(network, x0, noise, t), expected.float())
    assert torch.equal(network.seen[0], q_sample(x0, noise, t, abar)) and network.seen[2] is None
    eps_simple = DiffusionObjective(abar)  # the defaults: eps-prediction, simple weighting
    labels = torch.tensor([1, 0, 1])
    torch.testing.assert_close(eps_simple.losses(network, x0, noise, t, labels), torch.full((3,), 4.0))  # mean(eps²) = 4
    assert torch.equal(network.seen[2], labels)
    v = DiffusionObjective(abar, "v_prediction", "simple")
    a = abar[t]
    torch.testing.assert_close(v.losses(network, x0, noise, t), (a.sqrt() * 2.0 - (1 - a).sqrt() * 0.5).pow(2).float())


def test_the_objective_reads_its_settings_from_the_config():
    config = TrainingConfig(prediction_type="v_prediction", loss_weighting="min_snr", snr_gamma=3.0)
    objective = DiffusionObjective.from_config(config, linear_abar())
    assert (objective.prediction_type, objective.weighting, objective.snr_gamma, objective.num_timesteps) == ("v_prediction", "min_snr", 3.0, 1000)


def test_the_smoothed_curve_does_not_trail_a_falling_loss():
    from ddpm_hf.metrics import smooth, smooth_without_lag

    # The quick start's shape: logged every 50 steps, the loss falls fast, then levels off at 0.03.
    steps = range(50, 1101, 50)
    loss = [0.03 + 0.5 * math.exp(-step / 60) for step in steps]
    assert smooth(loss)[3] > 1.6 * loss[3]  # the forward average alone: 0.082 against 0.048 at step 200
    smoothed = smooth_without_lag(loss)
    assert all(abs(s - v) < 0.2 * v for s, v in list(zip(smoothed, loss))[2:]), [round(s / v, 3) for s, v in zip(smoothed, loss)]
    assert smoothed[-1] == pytest.approx(0.03, rel=1e-3)
    assert smooth_without_lag([]) == [] and smooth_without_lag([0.0, -1.0, 1.0])[1] < 0.5  # non-positive values: smoothed as they are


def test_the_training_loss_is_binned_by_tenths_of_the_chain():
    from ddpm_hf.step import binned_by_timestep

    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    t = torch.tensor([0, 99, 100, 550, 999])  # bins 0, 0, 1, 5, 9 of T = 1000
    sums, counts = binned_by_timestep(losses, t, 1000).tolist()
    assert sums == [3.0, 3.0, 0, 0, 0, 4.0, 0, 0, 0, 10.0] and counts == [2, 1, 0, 0, 0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_eps_errors_put_every_target_on_the_eps_scale(prediction_type):
    """One x0 estimate, expressed in each target's convention, has one eps-space error: SNR times its x0 error."""
    abar = linear_abar()
    t = torch.tensor([5, 200, 700])
    x0, noise = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    x0_hat = x0 + 0.1 * torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))

    class Network(torch.nn.Module):
        def forward(self, x_t, timesteps):
            a = abar[timesteps].reshape(-1, 1, 1, 1)
            eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
            outputs = {"sample": x0_hat, "epsilon": eps_hat, "v_prediction": a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat}
            return SimpleNamespace(sample=outputs[prediction_type])

    objective = DiffusionObjective(abar, prediction_type, "min_snr")
    losses, eps_errors = objective.losses_and_eps_errors(Network(), x0, noise, t)
    expected = snr(t, abar) * (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(eps_errors, expected, rtol=2e-3, atol=0)
    torch.testing.assert_close(losses, objective.losses(Network(), x0, noise, t))
