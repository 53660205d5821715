"""The loss-aware timestep sampler on synthetic loss histories."""

import math

import pytest
import torch

from ddpm_hf.resample import LossSecondMomentSampler, TimestepSampler, make_timestep_sampler

T = 8


def _filled(losses_per_t: list[list[float]]) -> LossSecondMomentSampler:
    sampler = LossSecondMomentSampler(T, history=len(losses_per_t[0]))
    for t, losses in enumerate(losses_per_t):
        sampler.update(torch.full((len(losses),), t), torch.tensor(losses))
    return sampler


def test_it_samples_uniformly_until_every_timestep_has_a_full_history():
    sampler = LossSecondMomentSampler(T, history=3)
    sampler.update(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7]), torch.rand(23) + 5)
    assert not sampler.warmed_up
    assert torch.equal(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    sampler.update(torch.tensor([7]), torch.tensor([1.0]))
    assert sampler.warmed_up and not torch.allclose(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))


def test_probabilities_follow_the_root_mean_square_loss_mixed_with_the_uniform_floor():
    history = [[float(t + 1), float(2 * t + 1)] for t in range(T)]
    sampler = _filled(history)
    rms = torch.tensor([math.sqrt((a * a + b * b) / 2) for a, b in history], dtype=torch.float64)
    expected = rms / rms.sum() * (1 - 0.001) + 0.001 / T
    assert torch.allclose(sampler.probabilities(), expected, rtol=1e-12)
    assert sampler.probabilities().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_the_floor_holds_where_the_loss_is_zero():
    history = [[0.0, 0.0]] + [[1.0, 1.0]] * (T - 1)
    p = _filled(history).probabilities()
    assert p[0].item() == pytest.approx(0.001 / T, rel=1e-12)  # uniform_prob / T, never zero
    assert (p >= 0.001 / T).all()


def test_importance_weights_keep_the_objective_unbiased():
    history = [[0.1 * (t + 1) ** 2, 0.2 * (t + 1)] for t in range(T)]
    sampler = _filled(history)
    per_t_loss = torch.arange(1, T + 1, dtype=torch.float64) ** 1.5  # any loss function of t
    p = sampler.probabilities()
    weights = 1 / (T * p)
    # Exactly: E_{t~p}[w_t L_t] = (1/T) sum_t L_t, the uniform objective.
    assert (p * weights * per_t_loss).sum().item() == pytest.approx(per_t_loss.mean().item(), rel=1e-12)
    # And the sampler's own draws estimate it.
    t, w = sampler.sample(200_000, torch.Generator().manual_seed(0))
    assert torch.allclose(w.double(), weights[t], rtol=1e-6)
    assert (w.double() * per_t_loss[t]).mean().item() == pytest.approx(per_t_loss.mean().item(), rel=0.01)
    # It does prefer the timesteps with larger losses.
    counts = torch.bincount(t, minlength=T)
    assert counts[-1] > 3 * counts[0]


def test_the_history_keeps_the_newest_losses_and_ignores_non_finite_ones():
    sampler = LossSecondMomentSampler(T, history=3)
    sampler.update(torch.tensor([2] * 5), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    sampler.update(torch.tensor([2, 2]), torch.tensor([float("nan"), float("inf")]))
    assert sampler.losses[2].tolist() == [3.0, 4.0, 5.0] and sampler.counts[2] == 3


def test_the_state_round_trips_and_gives_the_same_draws():
    sampler = _filled([[float(t), float(t) / 2] for t in range(T)])
    restored = LossSecondMomentSampler(T, history=2)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.probabilities(), sampler.probabilities())
    draws = [s.sample(64, torch.Generator().manual_seed(3)) for s in (sampler, restored)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    restored.load_state_dict({})  # a checkpoint from a run without the sampler: the history stays as it is
    assert restored.warmed_up
    with pytest.raises(ValueError, match="shape"):
        LossSecondMomentSampler(T + 1, history=2).load_state_dict(sampler.state_dict())


# ----- the one interface every sampler implements -----
@pytest.mark.parametrize("mode", ["uniform", "stratified", "loss_aware"])
def test_every_sampler_draws_timesteps_and_weights_through_one_interface(mode):
    sampler = make_timestep_sampler(mode, T)
    assert isinstance(sampler, TimestepSampler)
    timesteps, weights = sampler.sample(64, torch.Generator().manual_seed(0))
    assert timesteps.shape == weights.shape == (64,) and timesteps.dtype == torch.long
    assert 0 <= timesteps.min() and timesteps.max() < T
    assert torch.equal(weights, torch.ones(64))  # uniform until a sampler has learned otherwise
    again, _ = sampler.sample(64, torch.Generator().manual_seed(0))
    assert torch.equal(timesteps, again)
    sampler.update(timesteps, torch.rand(64))  # a no-op for the samplers that do not learn
    sampler.load_state_dict(sampler.state_dict())


def test_stratified_covers_every_slice_and_only_loss_aware_learns():
    timesteps, _ = make_timestep_sampler("stratified", T).sample(T, torch.Generator().manual_seed(1))
    assert sorted(timesteps.tolist()) == list(range(T))  # T slices of width 1
    learners = {mode: make_timestep_sampler(mode, T).learns_from_losses for mode in ("uniform", "stratified", "loss_aware")}
    assert learners == {"uniform": False, "stratified": False, "loss_aware": True}
    assert make_timestep_sampler("loss_aware", T).draws_on_host
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        make_timestep_sampler("importance", T)
