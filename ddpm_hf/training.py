"""The training loop: set up, optionally resume, optimise, maintain, finish. Read it top to bottom.

Randomness is replayable: everything a step draws (which examples, noise, timesteps, flips,
dropped labels) comes from a generator seeded by (seed, step, micro-batch) and is drawn for the
*global* batch, of which each process takes its slice. A resumed run therefore repeats the
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

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from . import checkpoints
from .config import TrainingConfig
from .data import InMemoryImages, StreamingImages, load_data, to_model_input
from .diagnostics import write_diagnostics_at_start, write_timestep_profile
from .errors import UserError
from .evaluate import DEFAULT_CACHE, Evaluator
from .hub import HubPusher, model_card
from .metrics import EVALUATION_FILE, VALIDATION_FILE, MetricsLog, peak_memory_bytes, smooth
from .models import build_noise_scheduler, build_unet, count_parameters, unet_config
from .objective import diffusion_losses, sample_timesteps
from .plots import plot_loss_curve
from .resample import LossSecondMomentSampler
from .sample import draw_images
from .sampling import class_grid_labels, generate, image_grid, pipeline_for, sampling_pipeline
from .seeds import derive_seed
from .validation import EarlyStopping, ValidationSet, make_validation_set, timestep_profile, validation_losses

HUB_STAGING = ".hub-staging"  # hard-linked copies of checkpoints while they upload
# Files and folders a run writes into output_dir (removed by --overwrite_output_dir).
RUN_OUTPUTS = (
    "training_config.json", "train_stats.json", "metrics.jsonl", VALIDATION_FILE, EVALUATION_FILE, "loss_curve.png", "model_index.json",
    "unet", "scheduler", "samples", "logs", "diagnostics", "best", "README.md", HUB_STAGING, checkpoints.CHECKPOINTS,
)
BEST = "best"


@dataclass
class TrainingProgress:
    """Where the run is; saved in every checkpoint through `accelerator.register_for_checkpointing`."""

    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0  # time inside optimisation steps, summed over every resume
    # The states of the loop's stateful helpers, refreshed just before each checkpoint.
    data_state: dict = field(default_factory=dict)
    sampler_state: dict = field(default_factory=dict)
    early_stopping: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


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
@dataclass
class StepDraws:
    """Everything random about one micro-batch, for this process's slice of the global batch."""

    noise: torch.Tensor  # eps
    timesteps: torch.Tensor  # t
    flips: torch.Tensor  # horizontal flip per example
    drop_labels: torch.Tensor | None  # class-conditional runs: replace the label by the null class
    weights: torch.Tensor | None  # loss-aware sampling: importance weight 1 / (T p_t)
    global_timesteps: torch.Tensor  # t of the whole global micro-batch (every process draws them all)


def draw_noise(config: TrainingConfig, step: int, micro: int, shape: tuple, rank: int, world_size: int, device,
               sampler: LossSecondMomentSampler | None = None) -> StepDraws:
    """The draws of the global micro-batch (step, micro), sliced to this process's share."""
    micro_batch = shape[0]
    global_batch = micro_batch * world_size
    generator = torch.Generator(device).manual_seed(derive_seed(config.seed, step, micro))
    noise = torch.randn((global_batch, *shape[1:]), generator=generator, device=device)
    weights = None
    if sampler is None:
        timesteps = sample_timesteps(global_batch, config.ddpm_num_steps, config.timestep_sampling, generator, device)
    else:  # its probabilities live on the host, so it draws from a host generator of its own
        host_generator = torch.Generator("cpu").manual_seed(derive_seed(config.seed, step, micro, 2))
        timesteps, weights = sampler.sample(global_batch, host_generator, device)
    flips = torch.rand(global_batch, generator=generator, device=device) < 0.5
    drops = torch.rand(global_batch, generator=generator, device=device) < config.cond_drop_prob if config.class_conditional else None
    mine = slice(rank * micro_batch, (rank + 1) * micro_batch)
    return StepDraws(
        noise=noise[mine], timesteps=timesteps[mine], flips=flips[mine],
        drop_labels=drops[mine] if drops is not None else None,
        weights=weights[mine] if weights is not None else None,
        global_timesteps=timesteps,
    )


def conditioning_labels(labels: torch.Tensor, drop: torch.Tensor, null_label: int) -> torch.Tensor:
    """Labels with the dropped ones replaced by the null class (classifier-free guidance training)."""
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def optimisation_step(accelerator, model, unet, optimizer, lr_scheduler, ema, data, alphas_cumprod, config: TrainingConfig, step: int,
                      random_flip: bool, sampler: LossSecondMomentSampler | None = None) -> tuple:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches, then the EMA update.

    Returns the mean loss and the gradient norm as device tensors (reading them would synchronise,
    except that the loss-aware sampler must read every step's losses).
    """
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    accumulation = config.gradient_accumulation_steps
    step_loss = torch.zeros((), device=device)
    for micro in range(accumulation):
        images, labels = data.next_batch(step, micro, accumulation)
        draws = draw_noise(config, step, micro, tuple(images.shape), rank, world_size, device, sampler)
        x0 = to_model_input(images)
        if random_flip:
            x0 = torch.where(draws.flips[:, None, None, None], x0.flip(-1), x0)
        class_labels = conditioning_labels(labels, draws.drop_labels, data.num_classes) if config.class_conditional else None
        torch.manual_seed(derive_seed(config.seed, step, micro, rank, 1))  # dropout masks, replayable
        # Gradients are all-reduced once per optimizer step: on the last micro-batch only.
        with contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model):
            losses = diffusion_losses(model, x0, draws.noise, draws.timesteps, alphas_cumprod, config.prediction_type,
                                      config.loss_weighting, config.snr_gamma, class_labels=class_labels)
            if sampler is not None:
                # Every process remembers the whole global batch, so all keep the same history.
                sampler.update(draws.global_timesteps.cpu(), accelerator.gather(losses.detach()).cpu())
                losses = losses * draws.weights  # importance weights keep the objective unbiased
            loss = losses.mean() / accumulation
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
# Maintenance: sample grids, validation, the best and the final pipeline
# ----------------------------------------------------------------------------------------------
def weights_for_sampling(unet: UNet2DModel, ema: EMAModel | None, sampling_unet: UNet2DModel) -> UNet2DModel:
    """Load the EMA weights (or the live ones, without EMA) into the separate sampling copy."""
    if ema is not None:
        ema.copy_to(sampling_unet.parameters())
    else:
        sampling_unet.load_state_dict(unet.state_dict())
    return sampling_unet.eval()


def write_sample_grid(sampling_unet: UNet2DModel, noise_scheduler, config: TrainingConfig, step: int, num_classes: int | None = None) -> str:
    """A grid of samples from a fixed seed; for a class-conditional run, one row per class."""
    pipeline = sampling_pipeline(sampling_unet, noise_scheduler, config.sampler)
    if config.class_conditional:
        labels, columns = class_grid_labels(num_classes, config.eval_batch_size)
        images = generate(pipeline, len(labels), config.grid_inference_steps, config.seed, class_labels=labels, guidance_scale=config.guidance_scale)
    else:
        images, columns = generate(pipeline, config.eval_batch_size, config.grid_inference_steps, config.seed), None
    path = os.path.join(config.output_dir, "samples", f"step_{step:07d}.png")
    image_grid(images, columns).save(path)
    return path


def save_pipeline_atomically(pipeline, folder: str, extra: dict | None = None) -> None:
    """save_pretrained into a temporary sibling, then rename: a crash never leaves half a pipeline."""
    partial = os.path.join(os.path.dirname(folder), f".tmp-{os.path.basename(folder)}")
    shutil.rmtree(partial, ignore_errors=True)
    pipeline.save_pretrained(partial, safe_serialization=True)
    if extra:
        _write_json(os.path.join(partial, "validation.json"), extra)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.replace(partial, folder)


def run_evaluation(evaluator: Evaluator, sampling_unet: UNet2DModel, noise_scheduler, config: TrainingConfig, num_classes: int | None) -> dict:
    """FID and classifier scores of --eval_num_samples images drawn as for the grids (EMA weights)."""
    started = time.perf_counter()
    pipeline = sampling_pipeline(sampling_unet, noise_scheduler, config.sampler)
    labels = torch.arange(config.eval_num_samples) % num_classes if config.class_conditional else None
    images = draw_images(pipeline, config.eval_num_samples, config.eval_batch_size, config.grid_inference_steps, config.seed,
                         class_labels=labels, guidance_scale=config.guidance_scale, progress=False)
    score = evaluator.score(images)
    keep = ("fid", "mean_confidence", "class_entropy_bits")
    return {**{k: score[k] for k in keep if k in score}, "eval_seconds": time.perf_counter() - started}


def run_validation(sampling_unet: UNet2DModel, validation: ValidationSet, alphas_cumprod: torch.Tensor, config: TrainingConfig, accelerator) -> tuple[float, list[dict]]:
    """(mean validation loss, per-timestep profile) of the sampling weights (EMA when on): the
    model that the grids, best/ and the final pipeline use. The same on every process."""
    losses = validation_losses(sampling_unet, validation, alphas_cumprod, config, accelerator, config.train_batch_size)
    return losses.double().mean().item(), timestep_profile(losses, validation.timesteps, config.ddpm_num_steps)


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
    data, held_out = load_data(config, device, rank, world_size)
    # Class-conditional: one embedding per class plus the null class (the last one) for guidance.
    num_class_embeds = data.num_classes + 1 if config.class_conditional else None
    unet_values = unet_config(config, data.channels, data.resolution, num_class_embeds)
    torch.manual_seed(config.seed)  # identical initial weights on every process
    model = build_unet(unet_values)
    noise_scheduler = build_noise_scheduler(config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    random_flip = config.random_flip if config.random_flip is not None else data.channels == 3
    sampler = LossSecondMomentSampler(config.ddpm_num_steps) if config.timestep_sampling == "loss_aware" else None
    validation = make_validation_set(held_out, config.ddpm_num_steps, config.seed) if held_out is not None else None
    early_stopping = EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta)

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

    # Create the Hub repo now: a bad token or name should fail in seconds, not after hours of training.
    pusher = HubPusher(config.hub_repo_id, config.hub_token, config.hub_private_repo) if config.push_to_hub and accelerator.is_main_process else None

    # --- resume ---
    metrics = MetricsLog(config.output_dir)
    validation_log = MetricsLog(config.output_dir, VALIDATION_FILE)
    run_info = {"training_config": config.to_dict(), "unet_config": dict(unet_values)}
    resume_path = checkpoints.resolve_resume(config.resume_from_checkpoint, config.output_dir)
    if resume_path is not None:
        checkpoints.check_compatible(checkpoints.read_run_info(resume_path), run_info["training_config"], unet_values)
        accelerator.load_state(resume_path)
        if ema is not None:
            ema.to(device)  # accelerate loads registered state onto the CPU
        data.load_state_dict(progress.data_state)
        if sampler is not None:
            sampler.load_state_dict(progress.sampler_state)
        early_stopping.load_state_dict(progress.early_stopping)
        if accelerator.is_main_process:
            for log in (metrics, validation_log, MetricsLog(config.output_dir, EVALUATION_FILE)):
                log.truncate_after(progress.step)
        accelerator.print(f"resumed from {resume_path} at step {progress.step}")
    elif config.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint under {checkpoints.checkpoints_root(config.output_dir)} yet: starting from step 0")
    if accelerator.is_main_process:  # only now: a refused resume must leave the run's files as they were
        config.save(os.path.join(config.output_dir, "training_config.json"))
        if progress.step == 0:
            write_diagnostics_at_start(config.output_dir, noise_scheduler.betas, alphas_cumprod, data.preview(4), config.seed)

    evaluator = None
    if config.eval_steps and accelerator.is_main_process:
        evaluator = Evaluator.build(config, data.channels, data.resolution, config.eval_extractor, os.environ.get("DDPM_HF_CACHE", DEFAULT_CACHE),
                                    config.inception_weights, seed=config.seed, device=device)
    evaluation_log = MetricsLog(config.output_dir, EVALUATION_FILE)

    # Every process holds a sampling copy: validation runs on all of them.
    sampling_unet = UNet2DModel.from_config(unet.config).to(device)
    parameters = count_parameters(unet)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("ddpm-hf", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()})
    examples = data.num_examples if data.num_examples is not None else "streamed"
    accelerator.print(
        f"examples: {examples} | images per step: {images_per_step} ({config.train_batch_size} x {world_size} processes x "
        f"{config.gradient_accumulation_steps} accumulation) | steps: {progress.step} -> {max_steps} | "
        f"UNet '{config.model_preset}': {parameters / 1e6:.2f}M parameters at {data.resolution}x{data.resolution}x{data.channels}"
        f"{f', {data.num_classes} classes + null' if config.class_conditional else ''} | "
        f"validation: {len(validation) if validation is not None else 'none'} | device: {device} | precision: {accelerator.mixed_precision}"
    )

    # --- train ---
    progress_bar = tqdm(total=max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="training", dynamic_ncols=True)

    def say(message: str) -> None:  # one line above the progress bar, from one process per machine
        if accelerator.is_local_main_process:
            progress_bar.write(message)

    interval = LoggingInterval(device)
    images_this_run, seconds_this_run = 0, 0.0
    model.train()
    while progress.step < max_steps and not early_stopping.stopped:
        loss, grad_norm = optimisation_step(accelerator, model, unet, optimizer, lr_scheduler, ema, data, alphas_cumprod, config, progress.step, random_flip, sampler)
        interval.add(loss, grad_norm)
        progress.step += 1
        progress.images_seen += images_per_step
        progress_bar.update(1)

        # --- maintenance: validation, logging, sample grids, checkpoints ---
        done = progress.step == max_steps
        if validation is not None and ((config.validation_steps and progress.step % config.validation_steps == 0) or done):
            with interval.paused():
                val_loss, profile = run_validation(weights_for_sampling(unet, ema, sampling_unet), validation, alphas_cumprod, config, accelerator)
                improved = early_stopping.observe(val_loss, progress.step)
                row = {"step": progress.step, "images_seen": progress.images_seen, "val_loss": val_loss, "best_val_loss": early_stopping.best_loss}
                if accelerator.is_main_process:
                    validation_log.append(row)
                    write_timestep_profile(config.output_dir, profile, progress.step)
                    if improved:
                        save_pipeline_atomically(pipeline_for(sampling_unet, noise_scheduler), os.path.join(config.output_dir, BEST),
                                                 {"step": progress.step, "val_loss": val_loss})
                    if config.report_to != "none":
                        accelerator.log({"val_loss": val_loss}, step=progress.step)
                say(f"step {progress.step}: validation loss {val_loss:.5f} (best {early_stopping.best_loss:.5f} at step {early_stopping.best_step})")
            if early_stopping.stopped:
                say(f"early stopping at step {progress.step}: no improvement over {early_stopping.best_loss:.5f} "
                    f"(step {early_stopping.best_step}) in {config.early_stopping_patience} validations; best model in {os.path.join(config.output_dir, BEST)}")
                done = True

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
            if evaluator is not None and (progress.step % config.eval_steps == 0 or done):
                scores = run_evaluation(evaluator, weights_for_sampling(unet, ema, sampling_unet), noise_scheduler, config, data.num_classes)
                evaluation_log.append({"step": progress.step, "images_seen": progress.images_seen, **scores})
                if config.report_to != "none":
                    accelerator.log({f"eval_{k}": v for k, v in scores.items()}, step=progress.step)
                say(f"step {progress.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
            if accelerator.is_main_process and ((config.save_images_steps and progress.step % config.save_images_steps == 0) or done):
                write_sample_grid(weights_for_sampling(unet, ema, sampling_unet), noise_scheduler, config, progress.step, data.num_classes)
            if (config.checkpointing_steps and progress.step % config.checkpointing_steps == 0) or done:
                progress.data_state = data.state_dict()
                progress.sampler_state = sampler.state_dict() if sampler is not None else {}
                progress.early_stopping = early_stopping.state_dict()
                path = checkpoints.save_checkpoint(accelerator, config.output_dir, progress.step, run_info, config.checkpoints_total_limit)
                say(f"saved checkpoint {path}")
                if pusher is not None and config.push_checkpoints:
                    pusher.push_checkpoint_in_background(path, os.path.join(config.output_dir, HUB_STAGING))
    progress_bar.close()

    # --- finish: the pipeline, the curve, the statistics ---
    accelerator.wait_for_everyone()
    stats = {}
    if accelerator.is_main_process:
        pipeline_for(weights_for_sampling(unet, ema, sampling_unet), noise_scheduler).save_pretrained(config.output_dir, safe_serialization=True)
        rows, validation_rows = metrics.read(), validation_log.read()
        if rows:
            plot_loss_curve(rows, os.path.join(config.output_dir, "loss_curve.png"), validation_rows)
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
            "final_val_loss": validation_rows[-1]["val_loss"] if validation_rows else None,
            "best_val_loss": early_stopping.best_loss,
            "best_step": early_stopping.best_step,
            "stopped_early": early_stopping.stopped,
            "parameters": parameters,
            "device": str(device),
            "num_processes": world_size,
            "mixed_precision": accelerator.mixed_precision,
            "config": config.to_dict(),
            "unet_config": dict(unet_values),
        }
        _write_json(os.path.join(config.output_dir, "train_stats.json"), stats)
        last_grid = f"samples/step_{progress.step:07d}.png"
        last_grid = last_grid if os.path.isfile(os.path.join(config.output_dir, last_grid)) else None
        with open(os.path.join(config.output_dir, "README.md"), "w") as f:
            f.write(model_card(pusher.repo_id if pusher else config.hub_repo_id, config.to_dict(), stats, last_grid))
        if pusher is not None:
            for failure in pusher.wait_for_checkpoints():
                say(f"warning: a checkpoint upload failed: {failure}")
            url = pusher.push_run(config.output_dir, f"Training run: {progress.step} steps", (last_grid,) if last_grid else ())
            accelerator.print(f"pushed to the Hub: {url}")
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
