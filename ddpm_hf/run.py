"""One training run as one object, and how it is built and resumed.

`Run` holds everything the step and the maintenance jobs read: the accelerator, the plain and
the wrapped model, EMA, optimizer, schedule, objective, timestep sampler, data, progress and the
outputs. `build_run` makes it from a config, resuming from a checkpoint when asked.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from . import checkpoints
from .config import TrainingConfig
from .sources import InMemoryImages, StreamingImages, load_data
from .diagnostics import write_diagnostics_at_start
from .ema import AverageSet, ExponentialMovingAverage, Guide, LiveWeights
from .environment import check_compiled_gradients, make_accelerator, prepare_output_dir, step_options
from .errors import UserError, first_line
from .faults import with_injected_faults
from .hub import HubPusher
from .interrupts import StopRequest
from .metrics import EVALUATION_FILE, VALIDATION_FILE, MetricsLog
from .models import build_noise_scheduler, build_unet, count_parameters, unet_config, use_plain_attention_on_cpu
from .objective import DiffusionObjective
from .resample import TimestepSampler, make_timestep_sampler
from .scoring import DEFAULT_CACHE, Evaluator
from .seeds import Stream, derive_seed
from .step import LoggingInterval
from .validation import EarlyStopping, ValidationSet, make_validation_set


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    images_seen: int = 0
    train_seconds: float = 0.0  # time inside optimisation steps, summed over every resume
    wall_seconds: float = 0.0  # wall time of the processes that trained the run, each until its last checkpoint
    nonfinite_streak: int = 0  # consecutive steps skipped for a non-finite loss or gradient

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class Run:
    config: TrainingConfig
    accelerator: Accelerator
    model: torch.nn.Module  # what the step calls: the UNet, compiled and/or DDP-wrapped
    unet: UNet2DModel  # the plain module inside it: EMA, sampling and saving read it
    unet_values: dict  # the resolved UNet config
    sampling_unet: UNet2DModel  # a separate copy that the sampling weights are loaded into
    noise_scheduler: DDPMScheduler
    objective: DiffusionObjective
    timestep_sampler: TimestepSampler
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ExponentialMovingAverage | LiveWeights
    extra_emas: AverageSet  # --extra_ema_decays: more lengths to choose from after training (often empty)
    guide: Guide | None  # --guide_step: autoguidance's guide, once the run has reached that step
    data: InMemoryImages | StreamingImages
    validation: ValidationSet | None
    early_stopping: EarlyStopping
    random_flip: bool
    images_per_step: int
    max_steps: int
    progress: Progress
    interval: LoggingInterval
    stop_request: StopRequest
    progress_bar: tqdm
    pusher: HubPusher | None
    metrics: MetricsLog
    validation_log: MetricsLog
    evaluation_log: MetricsLog
    evaluator: Evaluator | None = None
    started: float = 0.0  # time.time() at the start of this process's run
    wall_seconds_before: float = 0.0  # Progress.wall_seconds when this process resumed
    evaluation_seconds: float = 0.0  # spent by this process on evaluations (and the classifier's training)
    images_this_run: int = 0  # trained by this process, for its own images/s
    seconds_this_run: float = 0.0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def run_info(self) -> dict:
        """What every checkpoint records about the run, to refuse an incompatible resume."""
        return {"training_config": self.config.to_dict(), "unet_config": dict(self.unet_values)}

    def wall_seconds(self) -> float:
        """The run's wall time so far: the earlier processes' (until their last checkpoint) and this one's."""
        return self.wall_seconds_before + time.time() - self.started

    def say(self, message: str) -> None:
        """One line above the progress bar, from one process per machine."""
        if self.accelerator.is_local_main_process:
            self.progress_bar.write(message)

    def sampling_weights(self) -> UNet2DModel:
        """The separate sampling copy with the EMA weights loaded (the live ones without EMA)."""
        self.ema.copy_to(self.sampling_unet.parameters())
        return self.sampling_unet.eval()

    def sampling_guide(self) -> UNet2DModel | None:
        """The guide that grids and evaluations are autoguided by: None until --guide_step (or without one)."""
        return self.guide.unet if self.guide is not None else None

    def checkpoint_state(self) -> checkpoints.NamedState:
        extra = {"extra_emas": self.extra_emas} if self.extra_emas else {}  # absent without them: older checkpoints still load
        if self.guide is not None:
            extra["guide"] = self.guide
        return checkpoints.NamedState(progress=self.progress, ema=self.ema, lr_scheduler=self.lr_scheduler,
                                      timestep_sampler=self.timestep_sampler, data=self.data, early_stopping=self.early_stopping, **extra)


def total_train_steps(config: TrainingConfig, data: InMemoryImages | StreamingImages, images_per_step: int) -> int:
    if config.max_train_steps is not None:
        return config.max_train_steps
    if data.num_examples is None:
        raise UserError("--streaming needs --max_train_steps: a stream's length is not known in advance")
    return -(-config.num_epochs * data.num_examples // images_per_step)


def apply_epoch_intervals(config: TrainingConfig, data: InMemoryImages | StreamingImages, images_per_step: int) -> None:
    """diffusers' --save_images_epochs and --save_model_epochs, as the step intervals they mean here."""
    if config.save_images_epochs is None and config.save_model_epochs is None:
        return
    if data.num_examples is None:
        raise UserError("--save_images_epochs and --save_model_epochs need the data in memory (a stream's epoch length is unknown); "
                        "use --save_images_steps and --checkpointing_steps with --streaming")
    steps_per_epoch = -(-data.num_examples // images_per_step)
    if config.save_images_epochs is not None:
        config.save_images_steps = config.save_images_epochs * steps_per_epoch
    if config.save_model_epochs is not None:
        config.checkpointing_steps = config.save_model_epochs * steps_per_epoch


def make_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    fused = config.optimizer_implementation == "fused"
    return torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, fused=fused, foreach=not fused,
    )


def build_run(config: TrainingConfig, stop_request: StopRequest, cleanup: contextlib.ExitStack) -> Run:
    """Everything a run needs, resumed from its newest checkpoint when asked; the outputs started."""
    started = time.time()
    accelerator = make_accelerator(config)
    device, world_size = accelerator.device, accelerator.num_processes
    prepare_output_dir(config, accelerator)
    data, held_out = load_data(config, device, accelerator.process_index, world_size)
    # Class-conditional: one embedding per class plus the null class (the last one) for guidance.
    unet_values = unet_config(config, data.channels, data.resolution, data.num_classes + 1 if config.class_conditional else None)
    torch.manual_seed(derive_seed(Stream.MODEL_INIT, config.seed))  # identical initial weights on every process
    unet = build_unet(unet_values)
    use_plain_attention_on_cpu(unet, device)
    if config.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    noise_scheduler = build_noise_scheduler(config)
    progress = Progress()
    objective = with_injected_faults(DiffusionObjective.from_config(config, noise_scheduler.alphas_cumprod.to(device, torch.float32)), progress)

    optimizer = make_optimizer(unet, config)
    images_per_step = config.train_batch_size * world_size * config.gradient_accumulation_steps
    max_steps = total_train_steps(config, data, images_per_step)
    if config.guide_step is not None and config.guide_step >= max_steps:
        raise UserError(f"--guide_step ({config.guide_step}) must come before the run's last step ({max_steps}): "
                        "the guide is an earlier, weaker state of the same run")
    apply_epoch_intervals(config, data, images_per_step)
    # Stepped once per optimizer step on every process, so it is not passed to prepare(), which
    # would step it num_processes times.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=max_steps)
    model, optimizer = accelerator.prepare(unet, optimizer)
    unet = accelerator.unwrap_model(model, keep_torch_compile=False)  # the plain module, for EMA, sampling and saving
    if config.torch_compile:
        check_compiled_gradients(accelerator, model, unet, objective, config, data.num_classes if config.class_conditional else None)
    ema = (ExponentialMovingAverage(unet.parameters(), config.ema_max_decay, config.ema_inv_gamma, config.ema_power)
           if config.use_ema else LiveWeights(unet.parameters()))

    run = Run(
        config=config, accelerator=accelerator, model=model, unet=unet, unet_values=unet_values,
        sampling_unet=UNet2DModel.from_config(unet.config).to(device),  # every process holds one: validation runs on all
        noise_scheduler=noise_scheduler, objective=objective, timestep_sampler=make_timestep_sampler(config.timestep_sampling, config.ddpm_num_steps),
        optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema,
        extra_emas=AverageSet(unet.parameters(), config.extra_ema_decays, config.ema_inv_gamma, config.ema_power), data=data,
        guide=Guide(config.guide_step, lambda: UNet2DModel.from_config(unet.config).to(device)) if config.guide_step is not None else None,
        validation=make_validation_set(held_out, config.ddpm_num_steps, config.seed) if held_out is not None else None,
        early_stopping=EarlyStopping(config.early_stopping_patience, config.early_stopping_min_delta),
        random_flip=config.random_flip if config.random_flip is not None else data.channels == 3,
        images_per_step=images_per_step, max_steps=max_steps, progress=progress, interval=LoggingInterval(device),
        stop_request=stop_request, progress_bar=None,
        # Created now: a bad token or repo name should fail in seconds, not after hours of training.
        pusher=HubPusher(config.hub_repo_id, config.hub_token, config.hub_private_repo) if config.push_to_hub and accelerator.is_main_process else None,
        metrics=MetricsLog(config.output_dir), validation_log=MetricsLog(config.output_dir, VALIDATION_FILE),
        evaluation_log=MetricsLog(config.output_dir, EVALUATION_FILE), started=started,
    )
    accelerator.register_for_checkpointing(run.checkpoint_state())
    resume(run)
    start_outputs(run)
    run.progress_bar = cleanup.enter_context(tqdm(total=max_steps, initial=progress.step, disable=not accelerator.is_local_main_process,
                                                  desc="training", dynamic_ncols=True))
    return run


def resume(run: Run) -> None:
    """Load the newest checkpoint that is whole and loads (reporting every one skipped), and cut
    the logs back to its step; or start at step 0."""
    config, accelerator = run.config, run.accelerator
    candidates, skipped = checkpoints.resume_candidates(config.resume_from_checkpoint, config.output_dir)
    for message in skipped:
        accelerator.print(message)
    failures = []
    for candidate in candidates:
        # A different architecture or schedule is the user's mistake: refuse, never fall back.
        checkpoints.check_compatible(checkpoints.read_run_info(candidate), run.run_info["training_config"], run.unet_values)
        try:
            accelerator.load_state(candidate)
        except Exception as e:  # torch, safetensors and pickle each report a damaged file differently
            accelerator.print(f"skipping {candidate}: it could not be loaded ({first_line(e)}); it is left as it is")
            failures.append(candidate)
            continue
        run.wall_seconds_before = run.progress.wall_seconds
        if accelerator.is_main_process:
            for log in (run.metrics, run.validation_log, run.evaluation_log):
                log.truncate_after(run.progress.step)
        accelerator.print(f"resumed from {candidate} at step {run.progress.step}")
        return
    if failures:  # something was partly loaded: starting from step 0 now would train from mixed weights
        raise UserError(f"no checkpoint could be loaded ({', '.join(failures)}); resume from a specific folder with "
                        "--resume_from_checkpoint PATH, or start afresh with --overwrite_output_dir")
    if config.resume_from_checkpoint == "latest":
        accelerator.print(f"no checkpoint under {checkpoints.checkpoints_root(config.output_dir)} yet: starting from step 0")


def start_outputs(run: Run) -> None:
    """Save the config, draw the diagnostics of a new run, build the evaluator, start the
    trackers and print the run's derived numbers."""
    config, accelerator, data = run.config, run.accelerator, run.data
    if accelerator.is_main_process:  # only now: a refused resume must leave the run's files as they were
        config.save(os.path.join(config.output_dir, "training_config.json"))
        if run.progress.step == 0:
            write_diagnostics_at_start(config.output_dir, run.noise_scheduler.betas, run.objective.alphas_cumprod, data.preview(4), config.seed)
        if config.eval_steps:
            build_started = time.perf_counter()  # training the digit classifier is the measurement's cost, not training's
            run.evaluator = Evaluator.build(config, data.channels, data.resolution, config.eval_extractor, os.environ.get("DDPM_HF_CACHE", DEFAULT_CACHE),
                                            config.inception_weights, seed=config.seed, device=run.device)
            run.evaluation_seconds = time.perf_counter() - build_started
        if config.report_to != "none":
            accelerator.init_trackers("ddpm-hf", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()})
    examples = data.num_examples if data.num_examples is not None else "streamed"
    accelerator.print(
        f"examples: {examples} | images per step: {run.images_per_step} ({config.train_batch_size} x {accelerator.num_processes} processes x "
        f"{config.gradient_accumulation_steps} accumulation) | steps: {run.progress.step} -> {run.max_steps} | "
        f"UNet '{config.model_preset}': {count_parameters(run.unet) / 1e6:.2f}M parameters at {data.resolution}x{data.resolution}x{data.channels}"
        f"{f', {data.num_classes} classes + null' if config.class_conditional else ''} | "
        f"validation: {len(run.validation) if run.validation is not None else 'none'} | device: {run.device} | "
        f"precision: {accelerator.mixed_precision} | step: {', '.join(step_options(config, run.device))}"
    )
