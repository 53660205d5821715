"""The training loop: set up, optionally resume, optimise, maintain, finish. Read it top to bottom.

Randomness is replayable: everything a step draws (which examples, noise, timesteps, flips,
dropped labels) comes from a generator seeded by (seed, step, micro-batch) and is drawn for the
*global* batch, of which each process takes its slice. A resumed run therefore repeats the
uninterrupted one, and the data and noise do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import signal
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
from .interrupts import Interrupted, StopRequest, stop_on_signals
from .metrics import EVALUATION_FILE, VALIDATION_FILE, MetricsLog, peak_memory_bytes, smooth
from .models import build_noise_scheduler, build_unet, count_parameters, unet_config
from .objective import diffusion_losses, sample_timesteps
from .plots import plot_loss_curve
from .resample import LossSecondMomentSampler
from .sample import build_pipeline, draw_images, save_images
from .sampling import class_grid_labels, pipeline_for
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
    nonfinite_streak: int = 0  # consecutive steps skipped for a non-finite loss or gradient

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


# ----------------------------------------------------------------------------------------------
# Set-up helpers
# ----------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    fused = config.optimizer_implementation == "fused"
    return torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, fused=fused, foreach=not fused,
    )


def check_compiled_gradients(accelerator, model, unet: UNet2DModel, alphas_cumprod: torch.Tensor, config: TrainingConfig,
                             num_classes: int | None) -> None:
    """Compare the compiled model's gradients with eager mode's on one synthetic batch; refuse to
    train on a mismatch. Compiler bugs are silent: PyTorch 2.13's CPU inductor returns all-zero
    gradients for most of the UNet's weights (the loss itself matches), which would waste a run."""
    # The training batch's shape, so that the graph checked is the graph trained (compiled once).
    batch, size, channels = config.train_batch_size, unet.config.sample_size, unet.config.in_channels
    generator = torch.Generator(accelerator.device).manual_seed(config.seed)
    x0 = torch.rand((batch, channels, size, size), generator=generator, device=accelerator.device) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator, device=accelerator.device)
    timesteps = torch.randint(0, config.ddpm_num_steps, (batch,), generator=generator, device=accelerator.device)
    labels = torch.arange(batch, device=accelerator.device) % num_classes if num_classes is not None else None
    gradients = []
    for network in (unet, model):  # eager, then compiled (the first compiled call compiles)
        # no_sync: local gradients only, and DDP's reducer stays out of the eager pass.
        with accelerator.no_sync(model), accelerator.autocast():
            loss = diffusion_losses(network, x0, noise, timesteps, alphas_cumprod, config.prediction_type, config.loss_weighting,
                                    config.snr_gamma, class_labels=labels).mean()
            loss.backward()
        gradients.append([p.grad.detach().float().clone() for p in unet.parameters()])
        unet.zero_grad(set_to_none=True)
    # Relative error per weight: rounding (bf16 included) stays far below 0.1; a wrong kernel does not.
    wrong = sum(1 for eager, compiled in zip(*gradients) if (eager - compiled).norm() > 0.1 * eager.norm() + 1e-12)
    if wrong:
        raise UserError(f"--torch_compile gives wrong gradients here: {wrong} of {len(gradients[0])} weights disagree with eager mode "
                        f"(a PyTorch compiler bug on {accelerator.device.type}); train without --torch_compile")


def step_options(config: TrainingConfig, device: torch.device) -> list[str]:
    """How the training step is computed, for the start-up line."""
    options = [f"AdamW {config.optimizer_implementation}"]
    if config.channels_last:
        options.append("channels-last")
    if config.torch_compile:
        options.append("torch.compile")
    if config.allow_tf32 and device.type == "cuda":
        options.append("TF32")
    return options


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
        # prepare() compiles the model (and, under DDP, lets dynamo split graphs at bucket boundaries).
        dynamo_backend="inductor" if config.torch_compile else "no",
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


# Test hook: steps (comma-separated) whose loss is made NaN, to exercise the non-finite guard
# through the real command line. Unset in normal use.
FAULT_NONFINITE_STEPS = {int(s) for s in os.environ.get("DDPM_HF_FAULT_NONFINITE_STEPS", "").split(",") if s.strip()}


def optimisation_step(accelerator, model, unet, optimizer, lr_scheduler, ema, data, alphas_cumprod, config: TrainingConfig, step: int,
                      random_flip: bool, sampler: LossSecondMomentSampler | None = None) -> tuple:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches, then the EMA update.

    A non-finite loss, or a non-finite gradient without an fp16 grad scaler (which skips those
    itself), skips the update: no optimizer step, no EMA update. With fused AdamW the decision
    stays on the device (see apply_update), so on a GPU the step never waits for the host.

    :returns: (mean loss, gradient norm, whether the update was applied) as device tensors, and
      the last micro-batch's timesteps (for the report of a skipped step).
    """
    rank, world_size, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    accumulation = config.gradient_accumulation_steps
    step_loss = torch.zeros((), device=device)
    for micro in range(accumulation):
        images, labels = data.next_batch(step, micro, accumulation)
        draws = draw_noise(config, step, micro, tuple(images.shape), rank, world_size, device, sampler)
        x0, noise = to_model_input(images), draws.noise
        if config.channels_last:
            x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
        if random_flip:
            x0 = torch.where(draws.flips[:, None, None, None], x0.flip(-1), x0)
        class_labels = conditioning_labels(labels, draws.drop_labels, data.num_classes) if config.class_conditional else None
        torch.manual_seed(derive_seed(config.seed, step, micro, rank, 1))  # dropout masks, replayable
        # Gradients are all-reduced once per optimizer step: on the last micro-batch only.
        with contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model):
            losses = diffusion_losses(model, x0, noise, draws.timesteps, alphas_cumprod, config.prediction_type,
                                      config.loss_weighting, config.snr_gamma, class_labels=class_labels)
            if sampler is not None:
                # Every process remembers the whole global batch, so all keep the same history.
                sampler.update(draws.global_timesteps.cpu(), accelerator.gather(losses.detach()).cpu())
                losses = losses * draws.weights  # importance weights keep the objective unbiased
            loss = losses.mean() / accumulation
            if step in FAULT_NONFINITE_STEPS:
                loss = loss * float("nan")
            accelerator.backward(loss)
        step_loss += loss.detach()
    # clip_grad_norm_ unscales fp16 gradients first; with clipping off it still measures the norm.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
    applied = apply_update(accelerator, optimizer, step_loss, grad_norm)
    lr_scheduler.step()  # the schedule follows the step count, applied or not
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema_update(ema, unet.parameters(), applied)
    return step_loss, grad_norm.detach().float(), applied, draws.timesteps


def apply_update(accelerator, optimizer, step_loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Step the optimizer unless the loss or the gradient is non-finite; returns that flag on the device.

    Fused AdamW takes the flag itself (`found_inf`, the hook fp16's grad scaler uses) and leaves
    weights, moments and step count untouched when it is set, so the host never reads it. The
    foreach kernels cannot, so there the flag is read on the host, which waits for the device.
    Under fp16 the grad scaler skips non-finite gradients by itself; its skip is read on the host."""
    has_scaler = accelerator.scaler is not None
    finite = torch.isfinite(step_loss) if has_scaler else torch.isfinite(step_loss) & torch.isfinite(grad_norm)
    if has_scaler:
        if bool(finite):
            optimizer.step()
        return finite & (not accelerator.optimizer_step_was_skipped)
    if optimizer.optimizer.defaults.get("fused"):
        optimizer.optimizer.found_inf = (~finite).float()
        optimizer.step()
    elif bool(finite):
        optimizer.step()
    return finite


@torch.no_grad()
def ema_update(ema: EMAModel, parameters, applied: torch.Tensor) -> None:
    """`EMAModel.step` (its foreach form), weighted by the device flag `applied`: a skipped update
    leaves the average exactly as it was, without the host reading the flag. The warm-up counter
    counts every step; LoggingInterval.close takes the skipped ones back off when it reads the flags."""
    ema.optimization_step += 1
    decay = ema.get_decay(ema.optimization_step)
    ema.cur_decay_value = decay
    shadow = list(ema.shadow_params)
    drift = torch._foreach_sub(shadow, [p.detach() for p in parameters])
    torch._foreach_mul_(drift, applied.float() * (1 - decay))
    torch._foreach_sub_(shadow, drift)


def check_nonfinite_steps(summary: IntervalSummary, progress: TrainingProgress, ema: EMAModel | None, config: TrainingConfig, say) -> None:
    """Report the interval's skipped steps, and stop once --max_nonfinite_steps came in a row.

    The flags are read at logging steps (no step waits for the host), so a long run of bad steps
    is noticed at the logging step after it; those steps changed nothing, being skipped."""
    for step, t_min, t_max in summary.skipped:
        say(f"step {step}: non-finite loss or gradient (t in [{t_min}, {t_max}] on this process); update skipped")
    if ema is not None:
        ema.optimization_step -= len(summary.skipped)  # the EMA warm-up counts applied updates only
    longest = 0
    for applied in summary.applied_flags:
        progress.nonfinite_streak = 0 if applied else progress.nonfinite_streak + 1
        longest = max(longest, progress.nonfinite_streak)
    if longest >= config.max_nonfinite_steps:
        newest = checkpoints.list_checkpoints(config.output_dir)
        raise UserError(
            f"stopping at step {progress.step}: {longest} steps in a row had a non-finite loss or gradient; "
            f"the last good checkpoint is {newest[-1][1] if newest else 'none (no checkpoint was written yet)'}; "
            "lower --learning_rate, raise --lr_warmup_steps or --max_grad_norm clipping, or use bf16 instead of fp16"
        )


@dataclass
class IntervalSummary:
    mean_loss: float  # over applied steps and processes
    mean_grad_norm: float
    steps: int  # applied and skipped
    seconds: float
    skipped: list[tuple[int, int, int]]  # (step, t min, t max) of each skipped step
    applied_flags: list[bool]  # per step, in order


class LoggingInterval:
    """Sums over the steps since the last log line, kept on the device so that no step waits for
    the host, and the time those steps took, excluding maintenance (grids, checkpoints). The
    non-finite guard's per-step flags are kept here too, and read once, at the logging step."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self._restart()

    def _restart(self) -> None:
        self.loss_sum.zero_()
        self.grad_norm_sum.zero_()
        self.step_numbers: list[int] = []
        self.outcomes: list[torch.Tensor] = []  # per step: (applied, t min, t max) on the device
        self.started, self.paused_seconds = time.perf_counter(), 0.0

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, applied: torch.Tensor, timesteps: torch.Tensor) -> None:
        # where(), not multiplication: 0 * NaN would still be NaN.
        self.loss_sum += torch.where(applied, loss, 0.0)
        self.grad_norm_sum += torch.where(applied, grad_norm, 0.0)
        self.step_numbers.append(step)
        self.outcomes.append(torch.stack([applied.to(timesteps.dtype), timesteps.min(), timesteps.max()]))

    def running_seconds(self) -> float:
        """The optimisation time of this interval so far (call it outside ``paused``)."""
        return time.perf_counter() - self.started - self.paused_seconds

    @contextlib.contextmanager
    def paused(self):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - started

    def close(self, accelerator: Accelerator) -> IntervalSummary:
        """Read the interval from the device (the one wait of the interval) and start the next one.
        Skipped (non-finite) steps count in the time but not in the means."""
        seconds = max(self.running_seconds(), 1e-9)
        outcomes = torch.stack(self.outcomes).tolist() if self.outcomes else []
        applied = sum(int(flag) for flag, _, _ in outcomes)
        mean_loss = accelerator.reduce(self.loss_sum.clone(), reduction="mean").item() / applied if applied else float("nan")
        mean_grad_norm = self.grad_norm_sum.item() / applied if applied else float("nan")
        summary = IntervalSummary(
            mean_loss=mean_loss, mean_grad_norm=mean_grad_norm, steps=len(outcomes), seconds=seconds,
            skipped=[(step, int(t_min), int(t_max)) for step, (flag, t_min, t_max) in zip(self.step_numbers, outcomes) if not flag],
            applied_flags=[bool(flag) for flag, _, _ in outcomes],
        )
        self._restart()
        return summary


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


@torch.no_grad()
def weights_fingerprint(unet: UNet2DModel, ema: EMAModel | None) -> torch.Tensor:
    """A few float64 sums over the live and EMA weights (position-weighted, so swaps show too)."""
    sums = []
    for tensors in ([p.detach() for p in unet.parameters()], list(ema.shadow_params) if ema is not None else []):
        total = torch.zeros(2, dtype=torch.float64, device=unet.device)
        for i, tensor in enumerate(tensors, start=1):
            values = tensor.double()
            total += torch.stack([values.sum() * i, values.pow(2).sum()])
        sums.append(total)
    return torch.cat(sums)


def write_sample_grid(sampling_unet: UNet2DModel, noise_scheduler, config: TrainingConfig, step: int, num_classes: int | None = None) -> str:
    """A grid of samples from a fixed seed; for a class-conditional run, one row per class."""
    pipeline = build_pipeline(sampling_unet, noise_scheduler.config, config.sampler, sampling_unet.device)
    labels, columns = class_grid_labels(num_classes, config.eval_batch_size) if config.class_conditional else (None, None)
    count = len(labels) if labels is not None else config.eval_batch_size
    # Image i is seeded by (seed, i), as in the sampling command: the same noise at every step of the run.
    images = draw_images(pipeline, count, count, config.grid_inference_steps, config.seed, class_labels=labels,
                         guidance_scale=config.guidance_scale, progress=False)
    path = os.path.join(config.output_dir, "samples", f"step_{step:07d}.png")
    save_images(images, path, None, columns)
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
    pipeline = build_pipeline(sampling_unet, noise_scheduler.config, config.sampler, sampling_unet.device)
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


def load_newest_checkpoint(accelerator, config: TrainingConfig, training_config: dict, unet_values: dict) -> str | None:
    """Load the newest checkpoint that is whole and loads; report every one skipped. None: start fresh."""
    candidates, skipped = checkpoints.resume_candidates(config.resume_from_checkpoint, config.output_dir)
    for message in skipped:
        accelerator.print(message)
    failures = []
    for candidate in candidates:
        # A different architecture or schedule is the user's mistake: refuse, never fall back.
        checkpoints.check_compatible(checkpoints.read_run_info(candidate), training_config, unet_values)
        try:
            accelerator.load_state(candidate)
            return candidate
        except Exception as e:  # torch, safetensors and pickle each report a damaged file differently
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            accelerator.print(f"skipping {candidate}: it could not be loaded ({reason}); it is left as it is")
            failures.append(candidate)
    if failures:  # something was partly loaded: starting from step 0 now would train from mixed weights
        raise UserError(f"no checkpoint could be loaded ({', '.join(failures)}); resume from a specific folder with "
                        "--resume_from_checkpoint PATH, or start afresh with --overwrite_output_dir")
    return None


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def train(config: TrainingConfig) -> dict:
    """Train (or resume) one run as the config says; returns the statistics saved to train_stats.json.

    SIGINT/SIGTERM stop it after the current step with a checkpoint (see interrupts.py)."""
    # The exit stack closes the progress bar before any error is printed below it.
    with stop_on_signals() as stop_request, contextlib.ExitStack() as cleanup:
        try:
            return _train(config, stop_request, cleanup)
        finally:
            release_process_group()


def release_process_group() -> None:
    """Destroy the process group once nothing else holds it: after `_train` has returned.

    DistributedDataParallel's reducer keeps the group alive. If the reducer is the last owner, the
    group is destroyed from its deallocator with the GIL held; a gloo worker thread still
    releasing a just-finished gather's tensor then waits for that GIL while the deallocator waits
    for the thread, and the process hangs at exit. Collecting the wrapper first (it lives in
    reference cycles) leaves the group's last owner in Python, which destroys it without the GIL."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def finish_trackers(accelerator: Accelerator) -> None:
    """`accelerator.end_training()` without destroying the process group (release_process_group does)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def _train(config: TrainingConfig, stop_request: StopRequest, cleanup: contextlib.ExitStack) -> dict:
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

    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # --- optimisation ---
    optimizer = make_optimizer(model, config)
    images_per_step = config.train_batch_size * world_size * config.gradient_accumulation_steps
    max_steps = total_train_steps(config, data, images_per_step)
    # Stepped once per optimizer step on every process, so it is not passed to prepare(), which
    # would step it num_processes times.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unet = accelerator.unwrap_model(model, keep_torch_compile=False)  # the plain module, for EMA, sampling and saving
    if config.torch_compile:
        check_compiled_gradients(accelerator, model, unet, alphas_cumprod, config, data.num_classes if config.class_conditional else None)
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
    resume_path = load_newest_checkpoint(accelerator, config, run_info["training_config"], unet_values)
    if resume_path is not None:
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

    evaluator, evaluation_seconds = None, 0.0
    if config.eval_steps and accelerator.is_main_process:
        build_started = time.perf_counter()  # training the digit classifier is the measurement's cost, not training's
        evaluator = Evaluator.build(config, data.channels, data.resolution, config.eval_extractor, os.environ.get("DDPM_HF_CACHE", DEFAULT_CACHE),
                                    config.inception_weights, seed=config.seed, device=device)
        evaluation_seconds = time.perf_counter() - build_started
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
        f"validation: {len(validation) if validation is not None else 'none'} | device: {device} | precision: {accelerator.mixed_precision} | "
        f"step: {', '.join(step_options(config, device))}"
    )

    # --- train ---
    progress_bar = cleanup.enter_context(
        tqdm(total=max_steps, initial=progress.step, disable=not accelerator.is_local_main_process, desc="training", dynamic_ncols=True)
    )

    def say(message: str) -> None:  # one line above the progress bar, from one process per machine
        if accelerator.is_local_main_process:
            progress_bar.write(message)

    interval = LoggingInterval(device)
    images_this_run, seconds_this_run = 0, 0.0
    model.train()
    while progress.step < max_steps and not early_stopping.stopped:
        loss, grad_norm, applied, timesteps = optimisation_step(accelerator, model, unet, optimizer, lr_scheduler, ema, data, alphas_cumprod,
                                                                config, progress.step, random_flip, sampler)
        interval.add(progress.step + 1, loss, grad_norm, applied, timesteps)
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

        logging_step = progress.step % config.logging_steps == 0 or done
        if logging_step:
            summary = interval.close(accelerator)
            check_nonfinite_steps(summary, progress, ema, config, say)
            progress.train_seconds += summary.seconds
            images_this_run += summary.steps * images_per_step
            seconds_this_run += summary.seconds
            row = {
                "step": progress.step,
                "images_seen": progress.images_seen,
                "loss": summary.mean_loss,
                "grad_norm": summary.mean_grad_norm,
                "lr": lr_scheduler.get_last_lr()[0],
                "images_per_s": summary.steps * images_per_step / summary.seconds,
                "skipped_steps": len(summary.skipped),
                "elapsed_s": progress.train_seconds,
            }
            if accelerator.is_main_process:
                metrics.append(row)
                if config.report_to != "none":
                    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=progress.step)
            progress_bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.0f}")

        train_seconds_so_far = progress.train_seconds + interval.running_seconds()  # an evaluation may fall between logging steps
        with interval.paused():
            if evaluator is not None and (progress.step % config.eval_steps == 0 or done):
                scores = run_evaluation(evaluator, weights_for_sampling(unet, ema, sampling_unet), noise_scheduler, config, data.num_classes)
                evaluation_seconds += scores["eval_seconds"]
                # Time to quality: the optimisation time, and this process's wall time less the evaluations (and the classifier's training).
                evaluation_log.append({"step": progress.step, "images_seen": progress.images_seen, **scores,
                                       "train_s": train_seconds_so_far, "wall_s": time.time() - started - evaluation_seconds})
                if config.report_to != "none":
                    accelerator.log({f"eval_{k}": v for k, v in scores.items()}, step=progress.step)
                say(f"step {progress.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
            if accelerator.is_main_process and ((config.save_images_steps and progress.step % config.save_images_steps == 0) or done):
                write_sample_grid(weights_for_sampling(unet, ema, sampling_unet), noise_scheduler, config, progress.step, data.num_classes)
            # Agreeing on a stop is a collective that waits for the device, so with several
            # processes it happens at logging steps only: a signal ends the logging interval.
            signum = stop_request.agreed(accelerator) if world_size == 1 or logging_step else None
            if (config.checkpointing_steps and progress.step % config.checkpointing_steps == 0) or done or signum:
                progress.data_state = data.state_dict()
                progress.sampler_state = sampler.state_dict() if sampler is not None else {}
                progress.early_stopping = early_stopping.state_dict()
                path = checkpoints.save_checkpoint(accelerator, config.output_dir, progress.step, run_info, config.checkpoints_total_limit)
                say(f"saved checkpoint {path}")
                if pusher is not None and config.push_checkpoints:
                    pusher.push_checkpoint_in_background(path, os.path.join(config.output_dir, HUB_STAGING))
        if signum and not done:
            progress_bar.close()
            if pusher is not None:
                pusher.wait_for_checkpoints()
            finish_trackers(accelerator)
            raise Interrupted(f"stopped by {signal.Signals(signum).name} after step {progress.step}: the checkpoint is {path}; "
                              "run the same command with --resume_from_checkpoint latest to continue exactly where it stopped", signum)
    progress_bar.close()

    # --- finish: the pipeline, the curve, the statistics ---
    accelerator.wait_for_everyone()
    # Every process should hold the same weights and EMA; compare a fingerprint of each.
    fingerprints = accelerator.gather(weights_fingerprint(unet, ema)[None])
    ranks_identical = bool((fingerprints == fingerprints[0]).all())
    if not ranks_identical:
        say("warning: the processes ended with different weights; the saved pipeline is process 0's")
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
            "ranks_identical": ranks_identical,
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
    finish_trackers(accelerator)
    return stats


def _write_json(path: str, values: dict) -> None:
    with open(path, "w") as f:
        json.dump(values, f, indent=2, default=str)
        f.write("\n")
