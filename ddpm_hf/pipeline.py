"""`diffusers` pipelines for the two kinds of guidance: class-conditional DDPMs with classifier-free
guidance, and unconditional DDPMs with autoguidance.

Classifier-free guidance. The UNet has ``num_class_embeds = K + 1`` class embeddings: labels 0..K-1 are the dataset's
classes and label K is the "null" class that training substitutes for the real label with
probability ``cond_drop_prob``. One network therefore predicts both eps(x_t, t, y) and
eps(x_t, t, null), and guidance combines them (Ho and Salimans 2022, eq. 6, written with
s = 1 + w):

    eps_guided = eps_uncond + s (eps_cond - eps_uncond)

s = 1 is the plain conditional prediction, s = 0 the unconditional one, s > 1 trades
diversity for class fidelity. Any scheduler that steps on a model output works: DDPM, DDIM
(with ``eta``), DPM-Solver++ and the others diffusers offers for DDPM-trained models.

Load a saved one with ``ClassConditionalDDPMPipeline.from_pretrained(path)``.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
an unconditional model D is guided by a weaker version of itself, G (here: the same run's EMA
early in training, which train_ddpm.py saves with ``--guide_step``), with a weight w >= 1:

    D_w(x; t) = G(x; t) + w (D(x; t) - G(x; t))     (the paper's w D_1 + (1 - w) D_0)

Where the weak model errs, the strong one errs less in the same direction, so extrapolating away
from G moves samples towards the data's well-formed modes without the loss of variety that
classifier-free guidance brings (it needs no labels). w = 1 is the plain model. Load a trained
run with ``AutoGuidedDDPMPipeline.from_run(path)``.
"""

from __future__ import annotations

import inspect
import json
import os

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

GUIDE_DIR = "guide"  # in a run folder: the weaker model that autoguidance pushes away from (not part of model_index.json)
GUIDE_RECORD = "guidance.json"  # in GUIDE_DIR: the step it was taken at and the weight the run samples with


def null_class_label(unet: UNet2DModel) -> int:
    """The label of the unconditional ("null") class: the last class embedding."""
    if not unet.config.num_class_embeds:
        raise ValueError("this UNet has no class embedding; use diffusers' DDPMPipeline for an unconditional model")
    return unet.config.num_class_embeds - 1


def guided_prediction(unet: UNet2DModel, x_t: torch.Tensor, t, class_labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps_uncond + s (eps_cond - eps_uncond), with both halves in one batched forward pass.

    At s = 1 only the conditional half is computed: the formula reduces to it exactly.
    """
    if guidance_scale == 1.0:
        return unet(x_t, t, class_labels=class_labels).sample
    null = torch.full_like(class_labels, null_class_label(unet))
    if torch.is_tensor(t) and t.ndim > 0:  # one t per example (training-style calls): repeat it for both halves
        t = torch.cat([t, t])
    both = unet(torch.cat([x_t, x_t]), t, class_labels=torch.cat([class_labels, null])).sample
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def autoguided_prediction(unet: UNet2DModel, guide: UNet2DModel, x_t: torch.Tensor, t, guidance_scale: float) -> torch.Tensor:
    """G + w (D - G): the guide's prediction pushed towards, and past, the main model's.

    At w = 1 only the main model runs: the formula reduces to it exactly. Like classifier-free
    guidance it is linear in the networks' outputs, so it holds for eps, x0 and v alike.
    """
    main = unet(x_t, t).sample
    if guidance_scale == 1.0:
        return main
    weak = guide(x_t, t).sample
    return weak + guidance_scale * (main - weak)


def denoise(pipeline: DiffusionPipeline, batch_size: int, predict, generator, num_inference_steps: int, eta: float, output_type: str,
            return_dict: bool) -> ImagePipelineOutput | tuple:
    """The sampling loop both pipelines share: start from ``batch_size`` images of noise shaped as
    ``pipeline.unet`` takes them, ``predict(x_t, t)`` at each of the scheduler's timesteps and step,
    then return images in [0, 1] as ``output_type`` says."""
    config = pipeline.unet.config
    shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
    # Like DDPMPipeline: draw the starting noise on the generator's device, so a CPU generator
    # gives the same images on every device.
    image = randn_tensor(shape, generator=generator, device=pipeline._execution_device, dtype=pipeline.unet.dtype)
    image = image * pipeline.scheduler.init_noise_sigma
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(num_inference_steps, device=pipeline._execution_device)
    step_parameters = set(inspect.signature(scheduler.step).parameters)
    step_options = {"generator": generator} if "generator" in step_parameters else {}
    if "eta" in step_parameters:
        step_options["eta"] = eta
    for t in pipeline.progress_bar(scheduler.timesteps):
        model_output = predict(scheduler.scale_model_input(image, t), t)
        image = scheduler.step(model_output, t, image, **step_options).prev_sample

    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        result = image
    else:
        result = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            result = pipeline.numpy_to_pil(result)
    if not return_dict:
        return (result,)
    return ImagePipelineOutput(images=result)


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    """Sample a class-conditional UNet2DModel with classifier-free guidance.

    :param unet: a UNet2DModel with ``num_class_embeds`` = number of classes + 1 (the null class).
    :param scheduler: a DDPMScheduler, DDIMScheduler or another diffusers scheduler on the training schedule.
    :param class_names: the name of each class, in label order (saved in model_index.json, so
      ``class_labels`` may name classes: ``pipeline(["Sandal", "Bag"])``).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler, class_names: list[str] | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names) if class_names else None)

    @property
    def num_classes(self) -> int:
        return null_class_label(self.unet)

    @property
    def class_names(self) -> list[str]:
        """The classes' names in label order; their indices as text when the training data named none."""
        return list(self.config.class_names or [str(i) for i in range(self.num_classes)])

    def class_index(self, label: int | str) -> int:
        """The label of a class given by name (exactly, else ignoring case) or by index."""
        names = self.class_names
        if isinstance(label, str):
            if label in names:
                return names.index(label)
            lowered = [name.lower() for name in names]
            if label.lower() in lowered:
                return lowered.index(label.lower())
            if not label.lstrip("-").isdigit():
                raise ValueError(f"no class named {label!r}; this model's classes are {', '.join(names)}")
            label = int(label)
        if not 0 <= label < self.num_classes:
            raise ValueError(f"class_labels must lie in 0..{self.num_classes - 1} (this model has {self.num_classes} classes); got {label}")
        return int(label)

    def _labels(self, class_labels) -> torch.Tensor:
        if isinstance(class_labels, (str, int)):
            class_labels = [class_labels]
        if not torch.is_tensor(class_labels):
            class_labels = [self.class_index(label) if isinstance(label, str) else label for label in class_labels]
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 0:
            raise ValueError("class_labels is empty: give at least one class label")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"class_labels must lie in 0..{self.num_classes - 1} (this model has {self.num_classes} classes); got {labels.tolist()}")
        return labels.to(self._execution_device)

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Draw one image per entry of ``class_labels`` (an int or a class name, a list of them, or a tensor).

        :param guidance_scale: s in eps_uncond + s (eps_cond - eps_uncond); 1 = conditional only.
        :param eta: DDIM's noise scale (0 = deterministic); ignored by schedulers without it.
        :param output_type: "pil", "np" (floats in [0, 1], NHWC) or "pt" (NCHW tensor in [0, 1]).
        """
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        labels = self._labels(class_labels)
        # Guidance is linear, so it applies to whichever target the net predicts (eps, x0 or v).
        return denoise(self, len(labels), lambda x_t, t: guided_prediction(self.unet, x_t, t, labels, guidance_scale), generator,
                       num_inference_steps, eta, output_type, return_dict)


class AutoGuidedDDPMPipeline(DiffusionPipeline):
    """Sample an unconditional UNet2DModel with autoguidance by a weaker UNet of the same shape.

    :param unet: the trained model D (a run's pipeline, its EMA weights).
    :param guide: the weaker model G: train_ddpm.py's ``--guide_step`` saves the run's EMA at
      that step to ``OUTPUT/guide/``. It must take the same inputs and predict the same target.
    :param scheduler: a DDPMScheduler, DDIMScheduler or another diffusers scheduler on the training schedule.
    :param guidance_scale: the weight w used when a call gives none.
    """

    model_cpu_offload_seq = "unet->guide"

    def __init__(self, unet: UNet2DModel, guide: UNet2DModel, scheduler, guidance_scale: float = 1.0):
        super().__init__()
        for name in ("in_channels", "out_channels", "sample_size"):
            if getattr(unet.config, name) != getattr(guide.config, name):
                raise ValueError(f"the guide's {name} is {getattr(guide.config, name)}, the model's {getattr(unet.config, name)}: "
                                 "a guide must take the same images as the model")
        self.register_modules(unet=unet, guide=guide, scheduler=scheduler)
        self.register_to_config(guidance_scale=guidance_scale)  # the default weight, saved in model_index.json

    @classmethod
    def from_run(cls, model: str, guide: str | None = None, **options) -> "AutoGuidedDDPMPipeline":
        """The pipeline of a run folder (or Hub id) written by train_ddpm.py with ``--guide_step``:
        its pipeline as D and its ``guide/`` as G, sampled by default at the weight the run chose
        (``guide/guidance.json``). ``guide`` names another UNet folder (or Hub id) as G instead."""
        from diffusers import DDPMPipeline

        pipeline = DDPMPipeline.from_pretrained(model, **options)
        if guide:
            return cls(unet=pipeline.unet, guide=UNet2DModel.from_pretrained(guide, **options).eval(), scheduler=pipeline.scheduler)
        weak = UNet2DModel.from_pretrained(model, subfolder=GUIDE_DIR, **options).eval()
        record = read_guide_record(model)
        return cls(unet=pipeline.unet, guide=weak, scheduler=pipeline.scheduler, guidance_scale=record.get("guidance_scale", 1.0))

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Draw ``batch_size`` images.

        :param guidance_scale: w in G + w (D - G); 1 = the model alone (the guide is not run);
          default: the pipeline's own (the run's choice, for ``from_run``).
        :param eta: DDIM's noise scale (0 = deterministic); ignored by schedulers without it.
        :param output_type: "pil", "np" (floats in [0, 1], NHWC) or "pt" (NCHW tensor in [0, 1]).
        """
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
        return denoise(self, batch_size, lambda x_t, t: autoguided_prediction(self.unet, self.guide, x_t, t, guidance_scale), generator,
                       num_inference_steps, eta, output_type, return_dict)


def read_guide_record(model: str) -> dict:
    """``guide/guidance.json`` of a run folder or Hub id: {"step", "guidance_scale"}; {} when it has none."""
    path = os.path.join(model, GUIDE_DIR, GUIDE_RECORD)
    if not os.path.isdir(model):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = hf_hub_download(model, f"{GUIDE_DIR}/{GUIDE_RECORD}")
        except EntryNotFoundError:
            return {}
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
