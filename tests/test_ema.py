"""Our device-side EMA against diffusers' EMAModel, and the skip of a non-finite step."""

import pytest
import torch
from diffusers.training_utils import EMAModel

from ddpm_hf.ema import ExponentialMovingAverage, LiveWeights


def _parameters(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=generator)), torch.nn.Parameter(torch.randn(5, generator=generator))]


def test_the_decay_schedule_is_emamodels():
    theirs = EMAModel(_parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    ours = ExponentialMovingAverage(_parameters(), max_decay=0.999, inv_gamma=1.0, power=0.75)
    for n in range(1, 2000, 37):
        ours.applied_updates.fill_(n)
        assert ours.decay().item() == pytest.approx(theirs.get_decay(n), abs=1e-12)
    # Pinned values: the first update copies the weights, the second keeps 1 - 2**-0.75 of the average.
    ours.applied_updates.fill_(1)
    assert ours.decay().item() == 0.0
    ours.applied_updates.fill_(2)
    assert ours.decay().item() == pytest.approx(1 - 2**-0.75, abs=1e-12)


def test_applied_updates_match_emamodel_step_and_a_skipped_one_changes_nothing():
    live = _parameters(0)
    theirs = EMAModel([p.detach().clone() for p in live], decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    ours = ExponentialMovingAverage(live, max_decay=0.9999, inv_gamma=1.0, power=0.75)
    for step in range(6):
        with torch.no_grad():
            for p, new in zip(live, _parameters(step + 1)):
                p.copy_(new)
        if step == 3:  # a skipped step: the flag is False on the device
            before = [s.clone() for s in ours.shadow]
            ours.update(live, torch.tensor(False))
            assert all(torch.equal(a, b) for a, b in zip(before, ours.shadow)) and ours.applied_updates.item() == 3
            continue
        ours.update(live, torch.tensor(True))
        theirs.step(live)
    for a, b in zip(ours.shadow, theirs.shadow_params):
        assert torch.allclose(a, b, atol=1e-6)


def test_state_round_trips_and_without_ema_the_live_weights_are_used():
    ours = ExponentialMovingAverage(_parameters(0))
    ours.update(_parameters(1), torch.tensor(True))
    ours.update(_parameters(2), torch.tensor(True))
    restored = ExponentialMovingAverage(_parameters(5))
    restored.load_state_dict(ours.state_dict())
    assert restored.applied_updates.item() == 2 and all(torch.equal(a, b) for a, b in zip(restored.shadow, ours.shadow))
    target = _parameters(9)
    LiveWeights(_parameters(3)).copy_to(target)
    assert all(torch.equal(a, b) for a, b in zip(target, _parameters(3)))
