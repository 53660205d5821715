"""The training loop: set up, optionally resume, optimise, maintain, finish. Read it top to bottom.

Randomness is replayable: everything a step draws (which examples, noise, timesteps, flips)
comes from a generator seeded by (seed, step, micro-batch) and is drawn for the *global*
batch, of which each process takes its slice. A resumed run therefore repeats the
uninterrupted one, and the data and noise do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import DDPMPipeline, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import checkpoints
from .config import TrainingConfig
from .data import InMemoryImages, StreamingImages, load_training_data, to_model_input
from .errors import UserError
from .metrics import MetricsLog, peak_memory_bytes, smooth
from .models import build_noise_scheduler, build_unet, count_parameters, unet_config
from .objective import loss_weights, per_example_loss, q_sample, sample_timesteps, training_target
from .plots import plot_loss_curve
from .sampling import generate, image_grid, sampling_pipeline

# Files and folders a run writes into output_dir (removed by --overwrite_output_dir).
RUN_OUTPUTS = (
    "training_config.json", "train_stats.json", "metrics.jsonl", "loss_curve.png", "model_index.json",
    "unet", "scheduler", "samples", "logs", checkpoints.CHECKPOINTS,
)


@dataclass
class TrainingProgress:
    """Where the run is; saved in every checkpoint through `accelerator.register_for_checkpointing`."""

    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0  # time inside optimisation steps, summed over every resume
    data_state: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers such as (seed, step, micro-batch)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# Set-up helpers
# ----------------------------------------------------------------------------------------------
def _no_accelerator_hardware() -> bool:
    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or torch.backends.mps.is_available())


def make_accelerator(config: TrainingConfig) -> Accelerator:
    if config.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--report_to tensorboard needs the tensorboard package: pip install tensorboard (or pass --report_to none)") from None
    if config.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--report_to wandb needs the wandb package: pip install wandb (or pass --report_to none)") from None
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
    return Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")),
        # On a machine without GPUs, torchrun / accelerate launch still mean several CPU processes (gloo).
        cpu=_no_accelerator_hardware(),
    )


def prepare_output_dir(config: TrainingConfig, accelerator: Accelerator) -> None:
    """Refuse an output_dir we must not write into; never lose another run's files by accident."""
    out = config.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} is a file, not a folder; choose another --output_dir")
    holds_run = os.path.isfile(os.path.join(out, "training_config.json")) or os.path.isdir(checkpoints.checkpoints_root(out))
    if holds_run and config.resume_from_checkpoint is None and not config.overwrite_output_dir:
        raise UserError(
            f"--output_dir {out} already holds a training run; pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to replace it, or choose another --output_dir"
        )
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write-test-{accelerator.process_index}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --output_dir {out}: {e.strerror or e}") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if holds_run and config.overwrite_output_dir and config.resume_from_checkpoint is None:
            for name in RUN_OUTPUTS:
                path = os.path.join(out, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    accelerator.wait_for_everyone()


def total_train_steps(config: TrainingConfig, data: InMemoryImages | StreamingImages, images_per_step: int) -> int:
    if config.max_train_steps is not None:
        return config.max_train_steps
    if data.num_examples is None:
        raise UserError("--streaming needs --max_train_steps: a stream's length is not known in advance")
    return math.ceil(config.num_epochs * data.num_examples / images_per_step)


# ----------------------------------------------------------------------------------------------
# The optimisation step
# ----------------------------------------------------------------------------------------------
def draw_noise(config: TrainingConfig, step: int, micro: int, shape: tuple, rank: int, world_size: int, device) -> tuple:
    """eps, t and flip flags for this process's slice of the global micro-batch (step, micro)."""
    micro_batch = shape[0]
    global_shape = (micro_batch * world_size, *shape[1:])
    generator = torch.Generator(device).manual_seed(derive_seed(config.seed, step, micro))
    noise = torch.randn(global_shape, generator=generator, device=device)
    timesteps = sample_timesteps(global_shape[0], config.ddpm_num_steps, config.timestep_sampling, generator, device)
    flips = torch.rand(global_shape[0], generator=generator, device=device) < 0.5
    mine = slice(rank * micro_batch, (rank + 1) * micro_batch)
    return noise[mine], timesteps[mine], flips[mine]


def diffusion_losses(model, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, config: TrainingConfig) -> torch.Tensor:
    """Per-example weighted losses (B,) for one micro-batch (Ho et al. algorithm 1, lines 2-5)."""
    x_t = q_sample(x0, noise, timesteps, alphas_cumprod)
    prediction = model(x_t, timesteps).sample
    target = training_target(x0, noise, timesteps, alphas_cumprod, config.prediction_type)
    weights = loss_weights(timesteps, alphas_cumprod, config.prediction_type, config.loss_weighting, config.snr_gamma)
    return per_example_loss(prediction, target, weights)


def optimisation_step(accelerator, model, unet, optimizer, lr_scheduler, ema, data, alphas_cumprod, config: TrainingConfig, step: int, random_flip: bool) -> tuple:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches, then the EMA update.

    Returns the mean loss and the gradient norm as device tensors (reading them would synchronise).
    """
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    accumulation = config.gradient_accumulation_steps
    step_loss = torch.zeros((), device=device)
    for micro in range(accumulation):
        images, _labels = data.next_batch(step, micro, accumulation)
        noise, timesteps, flips = draw_noise(config, step, micro, tuple(images.shape), rank, world_size, device)
        x0 = to_model_input(images)
        if random_flip:
            x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
        torch.manual_seed(derive_seed(config.seed, step, micro, rank, 1))  # dropout masks, replayable
        # Gradients are all-reduced once per optimizer step: on the last micro-batch only.
        with contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model):
            loss = diffusion_losses(model, x0, noise, timesteps, alphas_cumprod, config).mean() / accumulation
            accelerator.backward(loss)
        step_loss += loss.detach()
    # clip_grad_norm_ unscales fp16 gradients first; with clipping off it still measures the norm.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None and not accelerator.optimizer_step_was_skipped:
        ema.step(unet.parameters())
    return step_loss, grad_norm.detach().float()


class LoggingInterval:
    """Sums over the steps since the last log line, kept on the device so that no step waits for
    the host, and the time those steps took, excluding maintenance (grids, checkpoints)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self._restart()

    def _restart(self) -> None:
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.steps, self.started, self.paused_seconds = 0, time.perf_counter(), 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - started

    def close(self, accelerator: Accelerator) -> tuple[float, float, int, float]:
        """(loss averaged over steps and processes, mean grad norm, steps, seconds); starts the next interval."""
        seconds = max(time.perf_counter() - self.started - self.paused_seconds, 1e-9)
        mean_loss = accelerator.reduce(self.loss_sum.clone(), reduction="mean").item() / self.steps
        mean_grad_norm = self.grad_norm_sum.item() / self.steps
        steps = self.steps
        self._restart()
        return mean_loss, mean_grad_norm, steps, seconds


# ----------------------------------------------------------------------------------------------
# Maintenance: sample grids and the final pipeline
# ----------------------------------------------------------------------------------------------
def weights_for_sampling(unet: UNet2DModel, ema: EMAModel | None, sampling_unet: UNet2DModel) -> UNet2DModel:
    """Load the EMA weights (or the live ones, without EMA) into the separate sampling copy."""
    if ema is not None:
        ema.copy_to(sampling_unet.parameters())
    else:
        sampling_unet.load_state_dict(unet.state_dict())
    return sampling_unet.eval()


def write_sample_grid(sampling_unet: UNet2DModel, noise_scheduler, config: TrainingConfig, step: int) -> str:
    pipeline = sampling_pipeline(sampling_unet, noise_scheduler, config.sampler)
    images = generate(pipeline, config.eval_batch_size, config.grid_inference_steps, config.seed)
    path = os.path.join(config.output_dir, "samples", f"step_{step:07d}.png")
    image_grid(images).save(path)
    return path


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def train(config: TrainingConfig) -> dict:
    """Train (or resume) one run as the config says; returns the statistics saved to train_stats.json."""
    started = time.time()
    accelerator = make_accelerator(config)
    device, rank, world_size = accelerator.device, accelerator.process_index, accelerator.num_processes
    if config.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    prepare_output_dir(config, accelerator)

    # --- data, model, schedule ---
    data = load_training_data(config, device, rank, world_size)
    unet_values = unet_config(config, data.channels, data.resolution)
    torch.manual_seed(config.seed)  # identical initial weights on every process
    model = build_unet(unet_values)
    noise_scheduler = build_noise_scheduler(config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    random_flip = config.random_flip if config.random_flip is not None else data.channels == 3

    # --- optimisation ---
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )
    images_per_step = config.train_batch_size * world_size * config.gradient_accumulation_steps
    max_steps = total_train_steps(config, data, images_per_step)
    # Stepped once per optimizer step on every process, so it is not passed to prepare(), which
    # would step it num_processes times.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unet = accelerator.unwrap_model(model)
    ema = None
    if config.use_ema:
        ema = EMAModel(
            unet.parameters(), decay=config.ema_max_decay, use_ema_warmup=True, inv_gamma=config.ema_inv_gamma,
            power=config.ema_power, foreach=True, model_cls=UNet2DModel, model_config=unet.config,
        )
        ema.to(device)
    progress = TrainingProgress()
    for state in [ema, lr_scheduler, progress]:
        if state is not None:
            accelerator.register_for_checkpointing(state)

    # --- resume ---
    metrics = MetricsLog(config.output_dir)
    run_info = {"training_config": config.to_dict(), "unet_config": dict(unet_values)}
    resume_path = checkpoints.resolve_resume(config.resume_from_checkpoint, config.output_dir)
    if resume_path is not None:
        checkpoints.check_compatible(checkpoints.read_run_info(resume_path), run_info["training_config"], unet_values)
        accelerator.load_state(resume_path)
        if ema is not None:
            ema.to(device)  # accelerate loads registered state onto the CPU
        data.load_state_dict(progress.data_state)
        if accelerator.is_main_process:
            metrics.truncate_after(progress.step)
        accelerator.print(f"resumed from {resume_path} at step {progress.step}")
    elif config.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint under {checkpoints.checkpoints_root(config.output_dir)} yet: starting from step 0")
    if accelerator.is_main_process:  # only now: a refused resume must leave the run's files as they were
        config.save(os.path.join(config.output_dir, "training_config.json"))

    sampling_unet = UNet2DModel.from_config(unet.config).to(device) if accelerator.is_main_process else None
    parameters = count_parameters(unet)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("ddpm-hf", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()})
    examples = data.num_examples if data.num_examples is not None else "streamed"
    accelerator.print(
        f"examples: {examples} | images per step: {images_per_step} ({config.train_batch_size} x {world_size} processes x "
        f"{config.gradient_accumulation_steps} accumulation) | steps: {progress.step} -> {max_steps} | "
        f"UNet '{config.model_preset}': {parameters / 1e6:.2f}M parameters at {data.resolution}x{data.resolution}x{data.channels} | "
        f"device: {device} | precision: {accelerator.mixed_precision}"
    )

    # --- train ---
    progress_bar = tqdm(total=max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="training", dynamic_ncols=True)
    interval = LoggingInterval(device)
    images_this_run, seconds_this_run = 0, 0.0
    model.train()
    while progress.step < max_steps:
        loss, grad_norm = optimisation_step(accelerator, model, unet, optimizer, lr_scheduler, ema, data, alphas_cumprod, config, progress.step, random_flip)
        interval.add(loss, grad_norm)
        progress.step += 1
        progress.images_seen += images_per_step
        progress_bar.update(1)

        # --- maintenance: logging, sample grids, checkpoints ---
        done = progress.step == max_steps
        if progress.step % config.logging_steps == 0 or done:
            mean_loss, mean_grad_norm, steps, seconds = interval.close(accelerator)
            progress.train_seconds += seconds
            images_this_run += steps * images_per_step
            seconds_this_run += seconds
            row = {
                "step": progress.step,
                "images_seen": progress.images_seen,
                "loss": mean_loss,
                "grad_norm": mean_grad_norm,
                "lr": lr_scheduler.get_last_lr()[0],
                "images_per_s": steps * images_per_step / seconds,
                "elapsed_s": progress.train_seconds,
            }
            if accelerator.is_main_process:
                metrics.append(row)
                if config.report_to != "none":
                    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=progress.step)
            progress_bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.0f}")

        with interval.paused():
            if accelerator.is_main_process and ((config.save_images_steps and progress.step % config.save_images_steps == 0) or done):
                write_sample_grid(weights_for_sampling(unet, ema, sampling_unet), noise_scheduler, config, progress.step)
            if (config.checkpointing_steps and progress.step % config.checkpointing_steps == 0) or done:
                progress.data_state = data.state_dict()
                path = checkpoints.save_checkpoint(accelerator, config.output_dir, progress.step, run_info, config.checkpoints_total_limit)
                if accelerator.is_local_main_process:
                    progress_bar.write(f"saved checkpoint {path}")
    progress_bar.close()

    # --- finish: the pipeline, the curve, the statistics ---
    accelerator.wait_for_everyone()
    stats = {}
    if accelerator.is_main_process:
        DDPMPipeline(unet=weights_for_sampling(unet, ema, sampling_unet), scheduler=noise_scheduler).save_pretrained(config.output_dir, safe_serialization=True)
        rows = metrics.read()
        if rows:
            plot_loss_curve(rows, os.path.join(config.output_dir, "loss_curve.png"))
        peak, peak_kind = peak_memory_bytes(device)
        stats = {
            "wall_time_s": round(time.time() - started, 2),
            "train_time_s": round(progress.train_seconds, 2),
            "steps": progress.step,
            "images_seen": progress.images_seen,
            "images_per_s": round(images_this_run / seconds_this_run, 2) if seconds_this_run else None,
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
            "final_loss_smoothed": smooth([r["loss"] for r in rows])[-1] if rows else None,
            "parameters": parameters,
            "device": str(device),
            "num_processes": world_size,
            "mixed_precision": accelerator.mixed_precision,
            "config": config.to_dict(),
            "unet_config": dict(unet_values),
        }
        _write_json(os.path.join(config.output_dir, "train_stats.json"), stats)
        accelerator.print(
            f"done: {progress.step} steps, {progress.images_seen} images in {stats['wall_time_s']:.0f} s "
            f"({stats['images_per_s']} images/s), smoothed loss {stats['final_loss_smoothed']}; pipeline saved to {config.output_dir}"
        )
    accelerator.end_training()
    return stats


def _write_json(path: str, values: dict) -> None:
    with open(path, "w") as f:
        json.dump(values, f, indent=2, default=str)
        f.write("\n")
