"""The process environment of a run: the accelerator, the output folder, the torch.compile
check, and the process group's orderly end."""

from __future__ import annotations

import gc
import json
import os
import platform

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from . import checkpoints
from .config import TrainingConfig
from .errors import UserError
from .files import remove
from .metrics import EVALUATION_FILE, VALIDATION_FILE
from .objective import DiffusionObjective
from .seeds import Stream, generator
from .weights import WEIGHTS_DIR, WEIGHTS_INDEX

HUB_STAGING = ".hub-staging"  # hard-linked copies of checkpoints while they upload
BEST = "best"
# Files and folders a run writes into output_dir (removed by --overwrite_output_dir).
RUN_OUTPUTS = (
    "training_config.json", "train_stats.json", "metrics.jsonl", VALIDATION_FILE, EVALUATION_FILE, "loss_curve.png", "model_index.json",
    "unet", "scheduler", "samples", "logs", "diagnostics", BEST, "README.md", HUB_STAGING, checkpoints.CHECKPOINTS, WEIGHTS_DIR, WEIGHTS_INDEX,
)


def _no_accelerator_hardware() -> bool:
    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or torch.backends.mps.is_available())


def dynamo_backend(config: TrainingConfig) -> str:
    """The torch.compile backend: with --torch_compile, the one accelerate was configured with
    (`accelerate launch --dynamo_backend X` or `accelerate config`, which set ACCELERATE_DYNAMO_BACKEND),
    inductor when that says none; without --torch_compile, none."""
    if not config.torch_compile:
        return "no"
    configured = os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    return "inductor" if configured == "no" else configured


def make_accelerator(config: TrainingConfig) -> Accelerator:
    """The accelerator for the config's precision, tracker and compile settings; refuses what cannot work here."""
    for tracker in ("tensorboard", "wandb"):
        if config.report_to == tracker:
            try:
                __import__(tracker)
            except ImportError:
                raise UserError(f"--report_to {tracker} needs the {tracker} package: pip install {tracker} (or pass --report_to none)") from None
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        # prepare() compiles the model (and, under DDP, lets dynamo split graphs at bucket boundaries).
        dynamo_backend=dynamo_backend(config),
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, config.logging_dir)),
        # On a machine without GPUs, torchrun / accelerate launch still mean several CPU processes (gloo).
        cpu=_no_accelerator_hardware(),
    )
    note = bf16_note(config, accelerator.device)
    if note:
        accelerator.print(note)
    if config.allow_tf32 and accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def bf16_note(config: TrainingConfig, device: torch.device) -> str | None:
    """The start-up note for bf16 autocast on a CPU that would only emulate it."""
    if config.mixed_precision == "bf16" and device.type == "cpu" and not _x86_cpu_computes_bf16():
        return ("note: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 autocast may run slower than fp32 here; "
                "if it does, pass --mixed_precision no")
    return None


def _x86_cpu_computes_bf16() -> bool:
    """False only on an x86 CPU without bf16 instructions, where autocast emulates bf16 in fp32 and
    is slower than plain fp32 (other CPUs: we cannot tell, so no note)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None) or all(check is None for check in checks)


def prepare_output_dir(config: TrainingConfig, accelerator: Accelerator) -> None:
    """Refuse an output_dir we must not write into; never lose another run's files by accident."""
    out = config.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_dir {out} is a file, not a folder; choose another --output_dir")
    holds_run = os.path.isfile(os.path.join(out, "training_config.json")) or os.path.isdir(checkpoints.checkpoints_root(out))
    if holds_run and config.resume_from_checkpoint is None and not config.overwrite_output_dir:
        continue_the_same_run(config)
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
                remove(os.path.join(out, name))
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    accelerator.wait_for_everyone()


# Options that may change between the processes of one run: how long it trains, what it logs,
# samples, evaluates, checkpoints and pushes. Any other difference means another run.
RERUN_MAY_CHANGE = (
    "max_train_steps", "num_epochs", "logging_steps", "report_to", "save_images_steps", "eval_batch_size", "sampler",
    "num_inference_steps", "guidance_scale", "eval_steps", "eval_start_step", "eval_num_samples", "eval_extractor", "inception_weights",
    "validation_steps", "checkpointing_steps", "checkpoints_total_limit", "save_images_epochs", "save_model_epochs", "logging_dir", "resume_from_checkpoint", "overwrite_output_dir",
    "dataloader_num_workers", "push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "push_checkpoints",
)


def continue_the_same_run(config: TrainingConfig) -> None:
    """The same command again in a folder that holds its run (after Ctrl-C, a crash, or to train
    longer) resumes it; a folder holding another run is refused, with the differences named."""
    out = config.output_dir
    try:
        with open(os.path.join(out, "training_config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if saved is None:
        raise UserError(f"--output_dir {out} already holds a training run; pass --resume_from_checkpoint latest to continue it, "
                        "--overwrite_output_dir to replace it, or choose another --output_dir")
    now = config.to_dict()
    differences = [f"{key}: {saved.get(key)!r} there, {now.get(key)!r} now" for key in sorted(set(saved) | set(now))
                   if key not in RERUN_MAY_CHANGE and saved.get(key) != now.get(key)]
    if differences:
        raise UserError(f"--output_dir {out} already holds a different training run ({'; '.join(differences)}); "
                        "pass --overwrite_output_dir to replace it, or choose another --output_dir")
    config.resume_from_checkpoint = "latest"


def step_options(config: TrainingConfig, device: torch.device) -> list[str]:
    """How the training step is computed, for the start-up line."""
    options = [f"AdamW {config.optimizer_implementation}"]
    if config.channels_last:
        options.append("channels-last")
    if config.torch_compile:
        options.append(f"torch.compile ({dynamo_backend(config)})")
    if config.allow_tf32 and device.type == "cuda":
        options.append("TF32")
    return options


def check_compiled_gradients(accelerator: Accelerator, model, unet, objective: DiffusionObjective, config: TrainingConfig,
                             num_classes: int | None) -> None:
    """Compare the compiled model's gradients with eager mode's on one synthetic batch; refuse to
    train on a mismatch. Compiler bugs are silent: PyTorch 2.13's CPU inductor returns all-zero
    gradients for most of the UNet's weights (the loss itself matches), which would waste a run."""
    # The training batch's shape, so that the graph checked is the graph trained (compiled once).
    batch, size, channels, device = config.train_batch_size, unet.config.sample_size, unet.config.in_channels, accelerator.device
    draws = generator(Stream.COMPILE_CHECK, config.seed, device=device)
    x0 = torch.rand((batch, channels, size, size), generator=draws, device=device) * 2 - 1
    noise = torch.randn(x0.shape, generator=draws, device=device)
    timesteps = torch.randint(0, objective.num_timesteps, (batch,), generator=draws, device=device)
    labels = torch.arange(batch, device=device) % num_classes if num_classes is not None else None
    gradients = []
    for network in (unet, model):  # eager, then compiled (the first compiled call compiles)
        # no_sync: local gradients only, and DDP's reducer stays out of the eager pass.
        with accelerator.no_sync(model), accelerator.autocast():
            objective.losses(network, x0, noise, timesteps, labels).mean().backward()
        gradients.append([p.grad.detach().float().clone() for p in unet.parameters()])
        unet.zero_grad(set_to_none=True)
    # Relative error per weight: rounding (bf16 included) stays far below 0.1; a wrong kernel does not.
    wrong = sum(1 for eager, compiled in zip(*gradients) if (eager - compiled).norm() > 0.1 * eager.norm() + 1e-12)
    if wrong:
        raise UserError(f"--torch_compile gives wrong gradients here: {wrong} of {len(gradients[0])} weights disagree with eager mode "
                        f"(a PyTorch compiler bug on {device.type}); train without --torch_compile")


def finish_trackers(accelerator: Accelerator) -> None:
    """`accelerator.end_training()` without destroying the process group (release_process_group does)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def release_process_group() -> None:
    """Destroy the process group once nothing else holds it: after training has returned.

    DistributedDataParallel's reducer keeps the group alive. If the reducer is the last owner, the
    group is destroyed from its deallocator with the GIL held; a gloo worker thread still
    releasing a just-finished gather's tensor then waits for that GIL while the deallocator waits
    for the thread, and the process hangs at exit. Collecting the wrapper first (it lives in
    reference cycles) leaves the group's last owner in Python, which destroys it without the GIL."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
