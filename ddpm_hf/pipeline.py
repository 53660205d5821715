"""A `diffusers` pipeline for class-conditional DDPMs with classifier-free guidance.

The UNet has ``num_class_embeds = K + 1`` class embeddings: labels 0..K-1 are the dataset's
classes and label K is the "null" class that training substitutes for the real label with
probability ``cond_drop_prob``. One network therefore predicts both eps(x_t, t, y) and
eps(x_t, t, null), and guidance combines them (Ho and Salimans 2022, eq. 6, written with
s = 1 + w):

    eps_guided = eps_uncond + s (eps_cond - eps_uncond)

s = 1 is the plain conditional prediction, s = 0 the unconditional one, s > 1 trades
diversity for class fidelity. Any scheduler that steps on a model output works: DDPM, DDIM
(with ``eta``), DPM-Solver++ and the others diffusers offers for DDPM-trained models.

Load a saved one with ``ClassConditionalDDPMPipeline.from_pretrained(path)``.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


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
        config = self.unet.config
        shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
        # Like DDPMPipeline: draw the starting noise on the generator's device, so a CPU generator
        # gives the same images on every device.
        image = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)
        image = image * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        step_options = {"generator": generator} if "generator" in step_parameters else {}
        if "eta" in step_parameters:
            step_options["eta"] = eta
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(image, t)
            # Guidance is linear, so it applies to whichever target the net predicts (eps, x0 or v).
            model_output = guided_prediction(self.unet, model_input, t, labels, guidance_scale)
            image = self.scheduler.step(model_output, t, image, **step_options).prev_sample

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result = image
        else:
            result = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        if not return_dict:
            return (result,)
        return ImagePipelineOutput(images=result)
