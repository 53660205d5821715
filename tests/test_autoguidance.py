"""Autoguidance (Karras et al. 2024): the guided prediction, the pipeline, the guide a run keeps
with --guide_step (saved, checkpointed, restored on resume) and the commands that sample with it."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from safetensors.torch import load_file

from ddpm_hf.checkpoints import read_training_state
from ddpm_hf.config import TrainingConfig
from ddpm_hf.errors import UserError
from ddpm_hf.models import build_unet, unet_config
from ddpm_hf.pipeline import AutoGuidedDDPMPipeline, autoguided_prediction
from ddpm_hf.training import train

from .conftest import run_module


def _net(seed: int, resolution: int = 16):
    torch.manual_seed(seed)
    return build_unet(unet_config(TrainingConfig(model_preset="micro"), channels=1, resolution=resolution)).eval()


@pytest.fixture(scope="module")
def nets():
    """Two differently initialised nets of one shape: the model and its guide."""
    return _net(0), _net(1)


@torch.no_grad()
def test_the_guided_prediction_is_the_guide_plus_w_times_the_difference(nets):
    unet, guide = nets
    x, t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([10, 500, 990])
    main, weak = unet(x, t).sample, guide(x, t).sample
    assert not torch.allclose(main, weak, atol=1e-3)  # the two nets differ, so the weight matters
    assert torch.equal(autoguided_prediction(unet, None, x, t, 1.0), main)  # w = 1: the model alone, the guide never runs
    assert torch.allclose(autoguided_prediction(unet, guide, x, t, 0.0), weak, atol=1e-6)
    assert torch.allclose(autoguided_prediction(unet, guide, x, t, 1.75), weak + 1.75 * (main - weak), atol=1e-6)
    # Extrapolation past the model: at w = 2 the prediction is as far beyond D as G is behind it.
    assert torch.allclose(autoguided_prediction(unet, guide, x, t, 2.0) - main, main - weak, atol=1e-5)


def _draw(pipeline, **options):
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(3)]  # one per image, as the commands draw
    return pipeline(batch_size=3, generator=generators, num_inference_steps=5, output_type="np", **options).images


def test_weight_one_draws_exactly_what_diffusers_ddpm_pipeline_draws(nets):
    unet, guide = nets
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    plain = _draw(DDPMPipeline(unet=unet, scheduler=scheduler))
    guided = AutoGuidedDDPMPipeline(unet=unet, guide=guide, scheduler=scheduler)
    assert np.array_equal(_draw(guided, guidance_scale=1.0), plain)
    assert np.abs(_draw(guided, guidance_scale=2.0) - plain).max() > 0.01


def test_the_pipeline_saves_and_loads_with_its_guide_and_weight(nets, tmp_path):
    unet, guide = nets
    AutoGuidedDDPMPipeline(unet=unet, guide=guide, scheduler=DDPMScheduler(num_train_timesteps=1000), guidance_scale=1.5).save_pretrained(tmp_path)
    loaded = AutoGuidedDDPMPipeline.from_pretrained(str(tmp_path))
    assert loaded.config.guidance_scale == 1.5
    assert all(torch.equal(a, b) for a, b in zip(loaded.guide.parameters(), guide.parameters()))
    with pytest.raises(ValueError, match="the guide's sample_size is 8, the model's 16"):
        AutoGuidedDDPMPipeline(unet=unet, guide=_net(1, resolution=8), scheduler=DDPMScheduler())


def _config(out, **overrides) -> TrainingConfig:
    values = dict(output_dir=str(out), model_preset="micro", train_batch_size=8, logging_steps=2, save_images_steps=0, report_to="none",
                  max_train_steps=6, checkpointing_steps=3, lr_warmup_steps=1, learning_rate=1e-3, eval_batch_size=4, num_inference_steps=2,
                  guide_step=3, guidance_scale=1.5, max_train_samples=200, eval_steps=1, eval_start_step=2, eval_num_samples=8)
    values.update(overrides)
    return TrainingConfig(**values)


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory, shared_evaluation_cache):
    out = tmp_path_factory.mktemp("guided") / "run"
    train(_config(out))
    return out


def test_the_run_keeps_its_ema_at_the_guide_step_as_the_guide(guided_run):
    assert json.loads((guided_run / "guide/guidance.json").read_text()) == {"step": 3, "guidance_scale": 1.5}
    guide = AutoGuidedDDPMPipeline.from_run(str(guided_run))
    assert guide.config.guidance_scale == 1.5
    ema_at_3 = read_training_state(str(guided_run / "checkpoints/checkpoint-3"))["ema"]["shadow"]
    assert all(torch.equal(g, e) for g, e in zip(guide.guide.parameters(), ema_at_3)), "the guide is not the EMA of its step"
    later = read_training_state(str(guided_run / "checkpoints/checkpoint-6"))
    assert later["guide"]["step"] == 3 and all(torch.equal(later["guide"]["weights"][k], v) for k, v in guide.guide.state_dict().items())
    assert not all(torch.equal(a, b) for a, b in zip(guide.unet.parameters(), guide.guide.parameters()))  # the model moved on
    # The plain pipeline still loads, and knows nothing of the guide.
    assert type(DDPMPipeline.from_pretrained(str(guided_run))) is DDPMPipeline
    assert "guide" not in json.loads((guided_run / "model_index.json").read_text())


def test_evaluations_start_at_eval_start_step_and_are_autoguided_from_the_guide_step_on(guided_run):
    rows = [json.loads(line) for line in (guided_run / "evaluation.jsonl").read_text().splitlines()]
    assert [(r["step"], r["autoguided"]) for r in rows] == [(2, False), (3, True), (4, True), (5, True), (6, True)]


def test_a_resumed_run_restores_its_guide_from_the_checkpoint_even_if_guide_folder_was_lost(guided_run, tmp_path, shared_evaluation_cache):
    split = tmp_path / "split"
    train(_config(split, max_train_steps=4, checkpointing_steps=4))
    shutil.rmtree(split / "guide")
    train(_config(split, checkpointing_steps=4, resume_from_checkpoint="latest"))
    for name in ["guide/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"]:
        straight, resumed = load_file(str(guided_run / name)), load_file(str(split / name))
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), f"{name} differs after a resume"
    # The final grid is drawn with the guide: the same pixels.
    assert np.array_equal(np.asarray(PIL.Image.open(guided_run / "samples/step_0000006.png")), np.asarray(PIL.Image.open(split / "samples/step_0000006.png")))
    with pytest.raises(UserError, match="guide_step: checkpoint 3, now 2"):
        train(_config(split, max_train_steps=8, guide_step=2, resume_from_checkpoint="latest"))


def test_sample_uses_the_runs_guide_at_its_weight_unless_told_otherwise(guided_run, tmp_path):
    def sample(name, *flags):
        result = run_module("ddpm_hf.sample", str(guided_run), "--num_images", "3", "--num_inference_steps", "3", "--out_dir", str(tmp_path / name), *flags)
        assert result.returncode == 0, result.stderr[-2000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        return report, np.stack([np.asarray(PIL.Image.open(tmp_path / name / f"{i:05d}.png")) for i in range(3)])

    (default_report, guided), (none_report, unguided), (one_report, weight_one) = sample("g"), sample("n", "--guide", "none"), sample("1", "--guidance_scale", "1")
    assert (default_report["guidance_scale"], default_report["autoguidance"]) == (1.5, True)
    assert (none_report["guidance_scale"], none_report["autoguidance"]) == (1.0, False)
    assert np.array_equal(weight_one, unguided) and not np.array_equal(guided, unguided)


def test_evaluate_sweeps_the_autoguidance_weight(guided_run, tmp_path, shared_evaluation_cache):
    result = run_module("ddpm_hf.evaluate", str(guided_run), "--guidance_scales", "1,2", "--num_samples", "20", "--batch_size", "20",
                        "--num_inference_steps", "2", "--report_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["autoguidance"] is True and [r["guidance_scale"] for r in report["guidance"]] == [1.0, 2.0]
    assert set(report["guidance"][0]) == {"guidance_scale", "fid", "seconds_per_image", "mean_confidence", "class_entropy_bits"}
    assert "| w |" in (tmp_path / "guidance.md").read_text() and "Autoguidance sweep" in (tmp_path / "guidance.md").read_text()
