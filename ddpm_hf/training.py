"""The training loop: build the run, then step and maintain until a job says stop, then finish.
Read `train` top to bottom; the step is in step.py, the jobs between steps in maintenance.py.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from .config import TrainingConfig
from .ema import LiveWeights
from .environment import finish_trackers, release_process_group
from .errors import DataStreamError
from .files import read_json, write_json
from .generation import pipeline_for
from .hub import measured_results, model_card
from .interrupts import Interrupted, stop_on_signals
from .maintenance import Stop, interrupted_message, maintain, save_guide, stop_before_training, stop_on_data_failure
from .metrics import peak_memory_bytes, smooth_without_lag
from .models import count_parameters
from .run import Run, build_run
from .step import optimisation_step
from .weights import RAW, WEIGHTS_DIR, WEIGHTS_INDEX, ema_name, weights_index


def train(config: TrainingConfig) -> dict:
    """Train (or resume) one run as the config says; returns the statistics saved to train_stats.json.

    SIGINT/SIGTERM stop it after the current step with a checkpoint (see interrupts.py)."""
    # The exit stack closes the progress bar before any error is printed below it.
    with stop_on_signals() as stop_request, contextlib.ExitStack() as cleanup:
        try:
            return run_training(config, stop_request, cleanup)
        finally:
            # Only once run_training has returned: its Run (and DDP's reducer in it) must be gone
            # before the process group is destroyed, or a two-process run can hang at exit.
            release_process_group()


def run_training(config: TrainingConfig, stop_request, cleanup: contextlib.ExitStack) -> dict:
    """Build the run, then one optimisation step and the maintenance after it until a job says stop."""
    run = build_run(config, stop_request, cleanup)
    try:
        run.model.train()
        stop = stop_before_training(run)
        while stop is None:
            try:
                outcome = optimisation_step(run)
            except DataStreamError as e:
                stop_on_data_failure(run, e)
            run.interval.add(run.progress.step + 1, outcome)
            run.progress.step += 1
            run.progress.images_seen += run.images_per_step
            run.progress_bar.update(1)
            stop = maintain(run)
        run.progress_bar.close()
        if stop.reason == "signal":
            end_interrupted_run(run, stop)
        return finish(run)
    except BaseException:
        run = None  # the traceback keeps this frame alive: let go of the run (and DDP) before the group is destroyed
        raise


def end_interrupted_run(run: Run, stop: Stop) -> None:
    """A signal stopped the run after its checkpoint: wait for uploads, close the trackers, say how to resume."""
    if run.pusher is not None:
        run.pusher.wait_for_checkpoints()
    finish_trackers(run.accelerator)
    raise Interrupted(interrupted_message(run, stop.signum), stop.signum)


def finish(run: Run) -> dict:
    """Save the final pipeline, the loss curve, the statistics and the model card; push to the Hub.

    A rerun of a run that had already finished trains nothing and leaves the run's own pipeline,
    statistics and model card as they are."""
    accelerator, config = run.accelerator, run.config
    accelerator.wait_for_everyone()
    ranks_identical = ranks_hold_the_same_weights(run)
    stats_path = os.path.join(config.output_dir, "train_stats.json")
    stats = {}
    if accelerator.is_main_process:
        saved = read_json(stats_path)  # {} when there is none yet
        finished_before = run.images_this_run == 0 and saved.get("steps") == run.progress.step
        if finished_before:
            stats = saved
            accelerator.print(f"{config.output_dir} holds this run, finished at step {run.progress.step}: nothing to train; "
                              "its pipeline, statistics and model card are left as they are")
        else:
            pipeline_for(run.sampling_weights(), run.noise_scheduler, run.data.class_names).save_pretrained(config.output_dir, safe_serialization=True)
            if run.sampling_guide() is not None:  # written again beside the pipeline, in case guide/ was lost since its step
                save_guide(run)
            save_weight_choices(run)
            stats = run_statistics(run, ranks_identical)
            write_json(stats_path, stats)
            mine = stats["this_process"]
            accelerator.print(
                f"done: {run.progress.step} steps, {run.progress.images_seen} images in {stats['train_time_s']:.0f} s of training "
                f"({stats['images_per_s']} images/s) and {stats['wall_time_s']:.0f} s in all; this process: {mine['images']} images in "
                f"{mine['train_time_s']:.0f} s ({mine['images_per_s']} images/s); smoothed loss {stats['final_loss_smoothed']}; "
                f"pipeline saved to {config.output_dir}"
            )
        write_card_and_push(run, stats, rewrite_card=not finished_before)
    finish_trackers(accelerator)
    return stats


def save_weight_choices(run: Run) -> None:
    """With --extra_ema_decays: the raw weights and each extra EMA length as pipelines in weights/,
    and weights.json naming every choice (sample and evaluate take --weights NAME)."""
    config = run.config
    if not run.extra_emas:
        return
    choices = [(RAW, LiveWeights(run.unet.parameters()))] + [(ema_name(decay), average) for decay, average in run.extra_emas.items()]
    for name, weights in choices:
        weights.copy_to(run.sampling_unet.parameters())
        pipeline = pipeline_for(run.sampling_unet.eval(), run.noise_scheduler, run.data.class_names)
        pipeline.save_pretrained(os.path.join(config.output_dir, WEIGHTS_DIR, name), safe_serialization=True)
    write_json(os.path.join(config.output_dir, WEIGHTS_INDEX), weights_index(ema_name(config.ema_max_decay), [name for name, _ in choices]))


@torch.no_grad()
def weights_fingerprint(run: Run) -> torch.Tensor:
    """A few float64 sums over the live and EMA weights (position-weighted, so swaps show too)."""
    sums = []
    for tensors in ([p.detach() for p in run.unet.parameters()], list(run.ema.shadow)):
        total = torch.zeros(2, dtype=torch.float64, device=run.device)
        for i, tensor in enumerate(tensors, start=1):
            values = tensor.double()
            total += torch.stack([values.sum() * i, values.pow(2).sum()])
        sums.append(total)
    return torch.cat(sums)


def ranks_hold_the_same_weights(run: Run) -> bool:
    """Every process should end with the same weights and EMA; compare a fingerprint of each."""
    fingerprints = run.accelerator.gather(weights_fingerprint(run)[None])
    identical = bool((fingerprints == fingerprints[0]).all())
    if not identical:
        run.say("warning: the processes ended with different weights; the saved pipeline is process 0's")
    return identical


def run_statistics(run: Run, ranks_identical: bool) -> dict:
    """train_stats.json: the clocks, the throughput, the final losses, the machine and the config."""
    from .plots import plot_loss_curve

    config, progress, best = run.config, run.progress, run.early_stopping
    rows, validation_rows = run.metrics.read(), run.validation_log.read()
    if rows:
        plot_loss_curve(rows, os.path.join(config.output_dir, "loss_curve.png"), validation_rows)
    peak, peak_kind = peak_memory_bytes(run.device)
    return {
        # The whole run, over every resume: optimisation time, and wall time (each earlier process until its last checkpoint).
        "wall_time_s": round(run.wall_seconds(), 2),
        "train_time_s": round(progress.train_seconds, 2),
        "steps": progress.step,
        "images_seen": progress.images_seen,
        "images_per_s": round(progress.images_seen / progress.train_seconds, 2) if progress.train_seconds else None,
        # This process's share: what it trained since it started (or resumed).
        "this_process": {
            "wall_time_s": round(time.time() - run.started, 2),
            "train_time_s": round(run.seconds_this_run, 2),
            "images": run.images_this_run,
            "images_per_s": round(run.images_this_run / run.seconds_this_run, 2) if run.seconds_this_run else None,
        },
        "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind,
        "final_loss_smoothed": smooth_without_lag([r["loss"] for r in rows])[-1] if rows else None,
        "final_val_loss": validation_rows[-1]["val_loss"] if validation_rows else None,
        "best_val_loss": best.best_loss,
        "best_step": best.best_step,
        "stopped_early": best.stopped,
        "class_names": run.data.class_names if config.class_conditional else None,
        "parameters": count_parameters(run.unet),
        "device": str(run.device),
        "num_processes": run.accelerator.num_processes,
        "ranks_identical": ranks_identical,
        "mixed_precision": run.accelerator.mixed_precision,
        "config": config.to_dict(),
        "unet_config": dict(run.unet_values),
    }


def write_card_and_push(run: Run, stats: dict, rewrite_card: bool = True) -> None:
    """README.md (the model card) beside the pipeline, then the push to the Hub when asked."""
    config, pusher = run.config, run.pusher
    last_grid = f"samples/step_{run.progress.step:07d}.png"
    last_grid = last_grid if os.path.isfile(os.path.join(config.output_dir, last_grid)) else None
    if rewrite_card:
        with open(os.path.join(config.output_dir, "README.md"), "w") as f:
            f.write(model_card(pusher.repo_id if pusher else config.hub_repo_id, config.to_dict(), stats, last_grid, measured_results(config.output_dir)))
    if pusher is not None:
        for failure in pusher.wait_for_checkpoints():
            run.say(f"warning: a checkpoint upload failed: {failure}")
        url = pusher.push_run(config.output_dir, f"Training run: {run.progress.step} steps", (last_grid,) if last_grid else ())
        run.accelerator.print(f"pushed to the Hub: {url}")
