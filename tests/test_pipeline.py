"""The class-conditional pipeline: guidance arithmetic, schedulers, save and load."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from ddpm_hf.config import TrainingConfig
from ddpm_hf.models import build_unet, unet_config
from ddpm_hf.pipeline import ClassConditionalDDPMPipeline, guided_prediction, null_class_label
from ddpm_hf.step import conditioning_labels

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = build_unet(unet_config(TrainingConfig(), channels=1, resolution=16, num_class_embeds=NUM_CLASSES + 1)).eval()
    # A fresh class embedding is random already; scale it so the classes clearly differ.
    with torch.no_grad():
        model.class_embedding.weight.mul_(5)
    return model


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 16, 16, generator=generator), torch.tensor([3, 400, 700, 999]), torch.tensor([0, 1, 2, 1])


@torch.no_grad()
def test_guidance_scale_one_is_the_conditional_prediction_and_zero_the_unconditional(unet):
    x, t, labels = _inputs()
    conditional = unet(x, t, class_labels=labels).sample
    unconditional = unet(x, t, class_labels=torch.full_like(labels, NUM_CLASSES)).sample
    assert null_class_label(unet) == NUM_CLASSES
    assert torch.equal(guided_prediction(unet, x, t, labels, 1.0), conditional)
    assert torch.allclose(guided_prediction(unet, x, t, labels, 0.0), unconditional, atol=1e-5)
    expected = unconditional + 3.0 * (conditional - unconditional)
    assert torch.allclose(guided_prediction(unet, x, t, labels, 3.0), expected, atol=1e-4)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)  # the label matters


def test_training_replaces_dropped_labels_by_the_null_class():
    labels = torch.tensor([0, 1, 2, 1])
    dropped = conditioning_labels(labels, torch.tensor([False, True, False, True]), null_label=NUM_CLASSES)
    assert dropped.tolist() == [0, NUM_CLASSES, 2, NUM_CLASSES]


@pytest.mark.parametrize("scheduler_class", [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_the_pipeline_round_trips_and_samples_with_each_scheduler(unet, tmp_path, scheduler_class):
    pipeline = ClassConditionalDDPMPipeline(unet=unet, scheduler=scheduler_class(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(tmp_path, safe_serialization=True)
    loaded = ClassConditionalDDPMPipeline.from_pretrained(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is scheduler_class and loaded.num_classes == NUM_CLASSES

    def draw(p, scale):
        return p([0, 2], guidance_scale=scale, generator=torch.Generator().manual_seed(0), num_inference_steps=4, output_type="np").images

    images = draw(pipeline, 2.0)
    assert images.shape == (2, 16, 16, 1) and (0 <= images).all() and (images <= 1).all()
    assert (draw(loaded, 2.0) == images).all()  # same weights, same seed, same images
    assert not (draw(loaded, 1.0) == images).all()  # the guidance scale matters


def test_ddim_eta_reaches_the_scheduler(unet):
    pipeline = ClassConditionalDDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)

    def draw(eta):
        return pipeline(1, generator=torch.Generator().manual_seed(0), num_inference_steps=4, eta=eta, output_type="pt").images

    assert torch.equal(draw(0.0), draw(0.0))
    assert not torch.equal(draw(0.0), draw(1.0))


def test_bad_class_labels_are_refused(unet):
    pipeline = ClassConditionalDDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        pipeline([NUM_CLASSES], num_inference_steps=1)  # the null class is not a class to draw
    with pytest.raises(ValueError, match="guidance_scale"):
        pipeline([0], guidance_scale=-1, num_inference_steps=1)


def overestimated_noise(x: torch.Tensor, alpha_bar: torch.Tensor, background: float = -1.0) -> torch.Tensor:
    """The noise in ``x`` if the clean image were all ``background``, predicted 5% too large: an
    undertrained net's typical error on a black background."""
    return 1.05 * (x - alpha_bar.sqrt() * background) / (1 - alpha_bar).sqrt()


@pytest.mark.parametrize("pass_none", [False, True], ids=["scheduler-default", "as-DDIMPipeline-calls-it"])
def test_ddim_draws_the_same_background_at_50_and_1000_steps_from_a_net_that_overestimates_the_noise(pass_none):
    """An undertrained net's typical error: the noise of a black background (-1) predicted 5% too
    large. Its x0 then lies far below -1 at high noise and is clipped every step. diffusers' DDIM
    default (clipped x0, unclipped noise) drifts: 50 steps end at -0.9999, 1000 steps at -0.0937,
    a grey background (what our DDIM-1000 grids showed). Re-deriving the noise from the clipped x0
    keeps the background black at both lengths."""
    from ddpm_hf.generation import SCHEDULERS

    config = DDPMScheduler(num_train_timesteps=1000).config  # clip_sample on, as every run writes it
    background = -1.0
    for steps in (50, 1000):
        scheduler = SCHEDULERS["ddim"](config)
        scheduler.set_timesteps(steps)
        x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        for t in scheduler.timesteps:
            noise = overestimated_noise(x, scheduler.alphas_cumprod[t].double(), background)
            options = {"use_clipped_model_output": None} if pass_none else {}
            x = scheduler.step(noise, t, x, **options).prev_sample
        assert x.mean().item() == pytest.approx(background, abs=1e-3), f"DDIM-{steps}"


def test_the_ddim_pipeline_we_build_keeps_the_consistent_scheduler():
    """DDIMPipeline rebuilds the scheduler it is given as a plain DDIMScheduler; build_pipeline must
    put ours back, or `sample --scheduler ddim` draws diffusers' drifting DDIM. The same net as above
    (noise 5% too large for a black image), behind the real pipeline and draw_images: 1,000 steps
    must end black (pixel 0); with diffusers' scheduler in its place some pixels end white."""
    from diffusers.models.unets.unet_2d import UNet2DOutput

    from ddpm_hf.generation import ConsistentDDIMScheduler, build_pipeline, draw_images

    config = DDPMScheduler(num_train_timesteps=1000).config
    alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod

    class OverestimatingNet(UNet2DModel):
        def forward(self, sample, timestep, *args, **kwargs):
            return UNet2DOutput(sample=overestimated_noise(sample, alphas_cumprod[timestep]))

    net = OverestimatingNet(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), norm_num_groups=8,
                            down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1)
    pipeline = build_pipeline(net, config, "ddim", torch.device("cpu"))
    assert isinstance(pipeline.scheduler, ConsistentDDIMScheduler)
    images = draw_images(pipeline, 1, 1, 1000, seed=0, progress=False)
    assert images.max().item() == 0
