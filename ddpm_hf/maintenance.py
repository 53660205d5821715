"""What happens between optimisation steps: one function per job, each deciding for itself
whether this step is its step. `maintain` runs them in order and says whether training stops.

Jobs that take time (validation, evaluation, grids, checkpoints) pause the logging interval's
clock, so the logged images/s measure the optimisation alone.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Literal

import torch

from . import checkpoints
from .diagnostics import write_timestep_profile
from .environment import BEST, HUB_STAGING
from .errors import UserError
from .files import atomic_path, write_json
from .generation import build_pipeline, class_grid_labels, draw_images, pipeline_for, save_images
from .pipeline import GUIDE_DIR, GUIDE_RECORD, AutoGuidedDDPMPipeline
from .validation import timestep_profile, validation_losses


@dataclass(frozen=True)
class Stop:
    """Why training stops: the step budget is spent, early stopping fired, or a signal arrived."""

    reason: Literal["finished", "early_stopping", "signal"]
    signum: int | None = None


def every(interval: int, step: int) -> bool:
    """True at multiples of ``interval``; never for an interval of 0 (only at the end)."""
    return bool(interval) and step % interval == 0


def stop_before_training(run) -> Stop | None:
    """A resumed run that had already ended does no further step."""
    if run.progress.step >= run.max_steps:
        return Stop("finished")
    return Stop("early_stopping") if run.early_stopping.stopped else None


def maintain(run) -> Stop | None:
    """Every job after a step, in order; returns why training stops, or None to go on."""
    step = run.progress.step
    stop = Stop("finished") if step >= run.max_steps else None
    take_guide(run)
    if validate(run, final=stop is not None) and stop is None:
        stop = Stop("early_stopping")
    logged = log_metrics(run, final=stop is not None)
    evaluate(run, final=stop is not None)
    write_grid(run, final=stop is not None)
    if stop is None:
        # Agreeing on a stop is a collective that waits for the device, so with several
        # processes it happens at logging steps only: a signal ends the logging interval.
        signum = run.stop_request.agreed(run.accelerator) if run.accelerator.num_processes == 1 or logged else None
        stop = Stop("signal", signum) if signum else None
    save_checkpoint(run, final=stop is not None)
    return stop


def validate(run, final: bool) -> bool:
    """The validation loss of the sampling weights at --validation_steps (and at the end), the
    per-timestep profile, best/ at each new best; True when early stopping fires."""
    config, progress = run.config, run.progress
    if run.validation is None or not (every(config.validation_steps, progress.step) or final):
        return False
    with run.interval.paused():
        losses, eps_errors = validation_losses(run.sampling_weights(), run.validation, run.objective, run.accelerator, config.train_batch_size,
                                               config.class_conditional)
        val_loss, val_eps_mse = losses.double().mean().item(), eps_errors.double().mean().item()
        improved = run.early_stopping.observe(val_loss, progress.step)
        best = run.early_stopping
        if run.accelerator.is_main_process:
            run.validation_log.append({"step": progress.step, "images_seen": progress.images_seen, "val_loss": val_loss, "best_val_loss": best.best_loss,
                                       "val_eps_mse": val_eps_mse})
            profile = timestep_profile(losses, run.validation.timesteps, config.ddpm_num_steps, eps_errors=eps_errors)
            write_timestep_profile(config.output_dir, profile, progress.step)
            if improved:
                save_best(run, {"step": progress.step, "val_loss": val_loss})
            if config.report_to != "none":
                run.accelerator.log({"val_loss": val_loss, "val_eps_mse": val_eps_mse}, step=progress.step)
        run.say(f"step {progress.step}: validation loss {val_loss:.5f} (best {best.best_loss:.5f} at step {best.best_step})")
    if best.stopped:
        run.say(f"early stopping at step {progress.step}: no improvement over {best.best_loss:.5f} (step {best.best_step}) in "
                f"{config.early_stopping_patience} validations; best model in {os.path.join(config.output_dir, BEST)}")
    return best.stopped


def take_guide(run) -> None:
    """At --guide_step: keep the sampling weights as autoguidance's guide (the grids and evaluations
    from this step on are guided by it) and write them to guide/, with the weight to sample at."""
    config, step = run.config, run.progress.step
    if run.guide is None or step != config.guide_step:
        return
    with run.interval.paused():
        run.guide.take(run.sampling_weights())
        if run.accelerator.is_main_process:
            save_guide(run)
    run.say(f"step {step}: kept the EMA weights as the autoguidance guide ({os.path.join(config.output_dir, GUIDE_DIR)}); "
            f"samples from now on use guide + {config.guidance_scale:g} (model - guide)")


def save_guide(run) -> None:
    """guide/: the guide UNet and guidance.json (the step it was taken at, the weight the run samples with)."""
    with atomic_path(os.path.join(run.config.output_dir, GUIDE_DIR)) as partial:
        run.guide.unet.save_pretrained(partial, safe_serialization=True)
        write_json(os.path.join(partial, GUIDE_RECORD), {"step": run.guide.step, "guidance_scale": run.config.guidance_scale})


def save_best(run, record: dict) -> None:
    """best/: the pipeline of the sampling weights (already loaded), with its validation record."""
    with atomic_path(os.path.join(run.config.output_dir, BEST)) as partial:
        pipeline_for(run.sampling_unet, run.noise_scheduler, run.data.class_names).save_pretrained(partial, safe_serialization=True)
        write_json(os.path.join(partial, "validation.json"), record)


def log_metrics(run, final: bool) -> bool:
    """At --logging_steps (and at the end): read the interval from the device, report skipped
    steps, append a metrics row, update the progress bar. True when it logged."""
    config, progress = run.config, run.progress
    if not (every(config.logging_steps, progress.step) or final):
        return False
    summary = run.interval.close(run.accelerator)
    check_nonfinite_steps(run, summary)
    progress.train_seconds += summary.seconds
    run.images_this_run += summary.steps * run.images_per_step
    run.seconds_this_run += summary.seconds
    row = {"step": progress.step, "images_seen": progress.images_seen, "loss": summary.mean_loss, "grad_norm": summary.mean_grad_norm,
           "lr": run.lr_scheduler.get_last_lr()[0], "images_per_s": summary.steps * run.images_per_step / summary.seconds,
           "skipped_steps": len(summary.skipped), "elapsed_s": progress.train_seconds, "loss_by_t": summary.loss_by_t}
    if run.accelerator.is_main_process:
        run.metrics.append(row)
        if config.report_to != "none":
            tracked = {k: v for k, v in row.items() if k not in ("step", "loss_by_t")}
            tracked.update({f"loss_by_t/{i}": v for i, v in enumerate(summary.loss_by_t) if v is not None})  # one curve per tenth of the chain
            run.accelerator.log(tracked, step=progress.step)
    run.progress_bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{row['images_per_s']:.0f}")
    return True


def check_nonfinite_steps(run, summary) -> None:
    """Report the interval's skipped steps, and stop once --max_nonfinite_steps came in a row.

    The flags are read at logging steps (no step waits for the host), so a long run of bad steps
    is noticed at the logging step after it; those steps changed nothing, being skipped."""
    progress = run.progress
    for step, t_min, t_max in summary.skipped:
        run.say(f"step {step}: non-finite loss or gradient (t in [{t_min}, {t_max}] on this process); update skipped")
    longest = 0
    for applied in summary.applied_flags:
        progress.nonfinite_streak = 0 if applied else progress.nonfinite_streak + 1
        longest = max(longest, progress.nonfinite_streak)
    if longest >= run.config.max_nonfinite_steps:
        newest = checkpoints.list_checkpoints(run.config.output_dir)
        raise UserError(
            f"stopping at step {progress.step}: {longest} steps in a row had a non-finite loss or gradient; "
            f"the last good checkpoint is {newest[-1][1] if newest else 'none (no checkpoint was written yet)'}; "
            "lower --learning_rate, raise --lr_warmup_steps or --max_grad_norm clipping, or use bf16 instead of fp16"
        )


# Pixels per sampling batch at which a small net's throughput levels off (measured on 2 CPU
# cores: 28-px digits drew 3.5x faster per image in batches of 100 than of 16).
EVALUATION_BATCH_PIXELS = 100 * 28 * 28


def evaluation_batch_size(config, sample_size: int) -> int:
    """Images per sampling batch for an evaluation: the grid's batch, raised for small images up to
    about EVALUATION_BATCH_PIXELS (the images do not depend on the batch size, only on their seeds)."""
    return max(config.eval_batch_size, min(config.eval_num_samples, EVALUATION_BATCH_PIXELS // sample_size**2))


def evaluate(run, final: bool) -> None:
    """FID and classifier scores of --eval_num_samples images (sampling weights) at --eval_steps and at the end."""
    config, progress = run.config, run.progress
    due = every(config.eval_steps, progress.step) and progress.step >= config.eval_start_step
    if run.evaluator is None or not (due or final):
        return
    train_seconds = progress.train_seconds + run.interval.running_seconds()  # an evaluation may fall between logging steps
    with run.interval.paused():
        started = time.perf_counter()
        pipeline = build_pipeline(run.sampling_weights(), run.noise_scheduler.config, config.sampler, run.device, guide=run.sampling_guide())
        labels = torch.arange(config.eval_num_samples) % run.data.num_classes if config.class_conditional else None
        images = draw_images(pipeline, config.eval_num_samples, evaluation_batch_size(config, run.unet.config.sample_size),
                             config.grid_inference_steps, config.seed,
                             class_labels=labels, guidance_scale=config.guidance_scale, progress=False)
        score = run.evaluator.score(images)
        scores = {**{k: score[k] for k in ("fid", "mean_confidence", "class_entropy_bits") if k in score},
                  "eval_seconds": time.perf_counter() - started}
        run.evaluation_seconds += scores["eval_seconds"]
        # Time to quality: the optimisation time, and this process's wall time less the evaluations (and the classifier's training).
        run.evaluation_log.append({"step": progress.step, "images_seen": progress.images_seen, **scores, "autoguided": isinstance(pipeline, AutoGuidedDDPMPipeline), "train_s": train_seconds,
                                   "wall_s": time.time() - run.started - run.evaluation_seconds})
        if config.report_to != "none":
            run.accelerator.log({f"eval_{k}": v for k, v in scores.items()}, step=progress.step)
        run.say(f"step {progress.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))


def write_grid(run, final: bool) -> str | None:
    """A grid of samples from a fixed seed at --save_images_steps (and at the end), captioned with
    its sampler; for a class-conditional run, one row per class, labelled with the class's name."""
    config, step = run.config, run.progress.step
    if not run.accelerator.is_main_process or not (every(config.save_images_steps, step) or final):
        return None
    with run.interval.paused():
        guide = run.sampling_guide()
        pipeline = build_pipeline(run.sampling_weights(), run.noise_scheduler.config, config.sampler, run.device, guide=guide)
        labels, columns = class_grid_labels(run.data.num_classes, config.eval_batch_size) if config.class_conditional else (None, None)
        count = len(labels) if labels is not None else config.eval_batch_size
        names = run.data.class_names or [str(i) for i in range(run.data.num_classes or 0)]
        row_labels = names if config.class_conditional else None
        caption = (f"step {step}, {config.sampler.upper()} {config.grid_inference_steps} steps, {'EMA' if config.use_ema else 'live'} weights"
                   + (f", guidance {config.guidance_scale:g}" if config.class_conditional else "")
                   + (f", autoguidance {config.guidance_scale:g} (guide: step {config.guide_step})" if guide is not None else ""))
        # Image i is seeded by (seed, i), as in the sampling command: the same noise at every step of the run.
        images = draw_images(pipeline, count, count, config.grid_inference_steps, config.seed, class_labels=labels,
                             guidance_scale=config.guidance_scale, progress=False)
        path = os.path.join(config.output_dir, "samples", f"step_{step:07d}.png")
        save_images(images, path, None, columns, row_labels, caption)
    return path


def save_checkpoint(run, final: bool) -> None:
    """A resumable checkpoint at --checkpointing_steps and whenever training stops; pushed in the
    background with --push_checkpoints."""
    config, step = run.config, run.progress.step
    if not (every(config.checkpointing_steps, step) or final):
        return
    run.progress.wall_seconds = run.wall_seconds()
    with run.interval.paused():
        path = checkpoints.save_checkpoint(run.accelerator, config.output_dir, step, run.run_info, config.checkpoints_total_limit)
        run.say(f"saved checkpoint {path}")
        if run.pusher is not None and config.push_checkpoints:
            run.pusher.push_checkpoint_in_background(path, os.path.join(config.output_dir, HUB_STAGING))


def stop_on_data_failure(run, error) -> None:
    """The data stream broke inside a step. Nothing of that step was applied and the source is back
    at the step's start, so the last complete step is checkpointed (unless it just was) and the run
    stops with a one-line error saying how to go on."""
    step = run.progress.step
    run.progress_bar.close()
    existing = dict((s, path) for s, path in checkpoints.list_checkpoints(run.config.output_dir))
    if step not in existing:
        save_checkpoint(run, final=True)
    path = os.path.join(checkpoints.checkpoints_root(run.config.output_dir), f"checkpoint-{step}")
    raise UserError(f"{error} (during step {step + 1}); the run is checkpointed at step {step} in {path}; "
                    "run the same command again to resume from there once the data can be read")


def interrupted_message(run, signum: int) -> str:
    newest = checkpoints.list_checkpoints(run.config.output_dir)[-1][1]
    return (f"stopped by {signal.Signals(signum).name} after step {run.progress.step}: the checkpoint is {newest}; "
            "run the same command again to continue exactly where it stopped")
