"""Validation loss, its per-timestep profile, early stopping, and the diagnostics tables."""

import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from ddpm_hf.config import TrainingConfig
from ddpm_hf.objective import DiffusionObjective
from ddpm_hf.sources import ValidationImages, load_data
from ddpm_hf.diagnostics import forward_process_strip, schedule_rows, strip_timesteps
from ddpm_hf.errors import UserError
from ddpm_hf.models import build_noise_scheduler, build_unet, unet_config
from ddpm_hf.validation import EarlyStopping, make_validation_set, timestep_profile, validation_losses

from .conftest import FAST, run_train

CPU = torch.device("cpu")


def _held_out(count=40) -> ValidationImages:
    config = TrainingConfig(validation_split="0.01", max_validation_samples=count)
    _, held_out = load_data(config, CPU)
    return held_out


def test_fraction_hold_out_is_disjoint_from_training_and_fixed_by_the_seed():
    config = TrainingConfig(validation_split="0.1", max_validation_samples=None)
    train, held_out = load_data(config, CPU)
    assert len(held_out) == 500 and train.num_examples == 4500
    again = load_data(config, CPU)[1]
    assert torch.equal(held_out.images, again.images) and torch.equal(held_out.labels, again.labels)
    training_rows = {bytes(x.flatten().tolist()) for x in train.images}
    assert not any(bytes(x.flatten().tolist()) in training_rows for x in held_out.images[:50])
    other_seed = load_data(TrainingConfig(validation_split="0.1", max_validation_samples=None, seed=1), CPU)[1]
    assert not torch.equal(held_out.images, other_seed.images)


def test_validation_draws_are_fixed_and_cover_every_bin():
    held_out = _held_out(40)
    first, second = make_validation_set(held_out, 1000, seed=0), make_validation_set(held_out, 1000, seed=0)
    assert torch.equal(first.timesteps, second.timesteps) and torch.equal(first.noise, second.noise)
    assert not torch.equal(first.noise, make_validation_set(held_out, 1000, seed=1).noise)
    # Stratified: exactly two of the 40 examples in each of the 20 bins of t.
    assert torch.bincount(first.timesteps // 50, minlength=20).tolist() == [2] * 20


def test_validation_loss_is_identical_when_evaluated_twice_on_the_same_weights():
    config = TrainingConfig(class_conditional=True)
    torch.manual_seed(0)
    unet = build_unet(unet_config(config, 1, 28, num_class_embeds=11)).eval()
    objective = DiffusionObjective.from_config(config, build_noise_scheduler(config).alphas_cumprod.float())
    validation = make_validation_set(_held_out(24), 1000, seed=0)
    accelerator = Accelerator(cpu=True)
    first, first_eps = validation_losses(unet, validation, objective, accelerator, batch_size=8, class_conditional=True)
    second, _ = validation_losses(unet, validation, objective, accelerator, batch_size=5, class_conditional=True)  # other batching, same values
    assert first.shape == (24,) and torch.allclose(first, second, rtol=1e-5, atol=1e-7)
    assert torch.equal(first, validation_losses(unet, validation, objective, accelerator, batch_size=8, class_conditional=True)[0])
    assert 0.2 < first.mean().item() < 5  # an untrained net's eps-MSE is of order 1
    assert torch.equal(first_eps, first)  # eps-prediction with simple weighting: the loss is the eps-MSE


def test_timestep_profile_averages_in_equal_bins():
    timesteps = torch.arange(1000)
    profile = timestep_profile(timesteps.float(), timesteps, 1000, bins=20)
    assert [r["t_start"] for r in profile[:3]] == [0, 50, 100] and profile[-1]["t_end"] == 999
    assert [r["count"] for r in profile] == [50] * 20
    assert profile[0]["mean_loss"] == pytest.approx(24.5) and profile[-1]["mean_loss"] == pytest.approx(974.5)
    assert "mean_eps_mse" not in profile[0]
    with_eps = timestep_profile(timesteps.float(), timesteps, 1000, bins=20, eps_errors=2 * timesteps.float())
    assert with_eps[0]["mean_eps_mse"] == pytest.approx(49.0) and with_eps[0]["mean_loss"] == pytest.approx(24.5)


def test_early_stopping_counts_validations_without_a_large_enough_improvement():
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    assert stopper.observe(1.0, step=10)  # the first value is always the best so far
    assert not stopper.observe(0.995, step=20)  # better, but by less than min_delta
    assert stopper.observe(0.98, step=30) and stopper.validations_without_improvement == 0
    assert not stopper.observe(0.99, step=40) and not stopper.stopped
    assert not stopper.observe(0.98, step=50) and stopper.stopped
    assert (stopper.best_loss, stopper.best_step) == (0.98, 30)
    restored = EarlyStopping(patience=2, min_delta=0.01)
    restored.load_state_dict(stopper.state_dict())
    assert restored == stopper
    never = EarlyStopping(patience=None)
    for step in range(10):
        never.observe(1.0, step)
    assert not never.stopped


def test_schedule_table_matches_the_linear_schedule():
    scheduler = build_noise_scheduler(TrainingConfig())
    rows = schedule_rows(scheduler.betas, scheduler.alphas_cumprod)
    assert len(rows) == 1000
    assert rows[0]["beta"] == pytest.approx(1e-4) and rows[-1]["beta"] == pytest.approx(0.02)
    assert rows[0]["alpha_bar"] == pytest.approx(1 - 1e-4) and rows[-1]["alpha_bar"] == pytest.approx(4.04e-5, rel=0.01)
    assert rows[0]["log_snr"] == pytest.approx(9.21, abs=0.01) and rows[-1]["log_snr"] == pytest.approx(-10.12, abs=0.01)
    assert all(a["log_snr"] > b["log_snr"] for a, b in zip(rows, rows[1:]))


def test_forward_process_strip_goes_from_the_image_to_noise():
    images = _held_out(3).images
    abar = build_noise_scheduler(TrainingConfig()).alphas_cumprod
    assert strip_timesteps(1000) == [0, 100, 250, 500, 750, 999] and strip_timesteps(50) == [0, 5, 12, 25, 38, 49]
    pictures, rows = forward_process_strip(images, abar, seed=0)
    assert pictures.shape == (18, 28, 28, 1)
    assert abs(pictures[0].mean() - images[0].float().mean().item() / 255) < 0.01  # t = 0 is the image
    assert rows[-1]["x_t_std"] == pytest.approx(1.0, abs=0.1)  # t = 999 is almost pure N(0, 1)
    assert [r["t"] for r in rows] == [0, 100, 250, 500, 750, 999]


def test_validation_split_mistakes_are_refused():
    with pytest.raises(UserError, match="only a train split"):
        load_data(TrainingConfig(validation_split="test"), CPU)
    with pytest.raises(UserError, match=r"in \(0, 1\)"):
        TrainingConfig(validation_split="1.5")
    with pytest.raises(UserError, match="needs a validation loss"):
        TrainingConfig(early_stopping_patience=3)
    with pytest.raises(UserError, match="streaming"):
        load_data(TrainingConfig(validation_split="0.1", streaming=True), CPU)


def test_early_stopping_fires_on_a_flat_validation_loss_and_keeps_the_best_step(tmp_path):
    """A learning rate of 1e-8 moves the weights but not the validation loss by 1e-3: the run
    stops after two validations without improvement, and best/ holds step 2's weights."""
    out = tmp_path / "flat"
    args = [*FAST, "--max_train_steps", "40", "--learning_rate", "1e-8", "--lr_warmup_steps", "0", "--use_ema", "false",
            "--validation_split", "0.01", "--validation_steps", "2", "--early_stopping_patience", "2",
            "--early_stopping_min_delta", "1e-3", "--checkpointing_steps", "2", "--checkpoints_total_limit", "5", "--output_dir", str(out)]
    result = run_train(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "early stopping at step 6" in result.stdout + result.stderr
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["stopped_early"] and stats["steps"] == 6 and stats["best_step"] == 2
    rows = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert max(r["val_loss"] for r in rows) - min(r["val_loss"] for r in rows) < 1e-3
    assert json.loads((out / "best/validation.json").read_text())["step"] == 2

    best = load_file(str(out / "best/unet/diffusion_pytorch_model.safetensors"))
    at_step_2 = load_file(str(out / "checkpoints/checkpoint-2/model.safetensors"))
    final = load_file(str(out / "unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(best[k], at_step_2[k]) for k in best)
    assert any(not torch.equal(best[k], final[k]) for k in best)
    for step in (2, 4, 6):
        assert (out / f"diagnostics/timestep_loss_step_{step:07d}.csv").is_file()
    assert (out / "diagnostics/schedule.png").is_file() and (out / "diagnostics/forward_process.png").is_file()

    # Running the same command again resumes into a finished, stopped run: no further steps.
    again = run_train([*args, "--resume_from_checkpoint", "latest"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "train_stats.json").read_text())["steps"] == 6
