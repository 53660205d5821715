"""Resumable checkpoints: `accelerator.save_state` written atomically, rotated, found again, checked.

Layout: ``output_dir/checkpoints/checkpoint-<step>/`` holds what `accelerate` saves (model
weights in safetensors, optimizer, grad scaler, RNG states of every process, and the registered
objects: EMA, lr scheduler, training progress) plus ``run_info.json``: the training config and
the resolved UNet config, so a resume with another architecture or schedule is refused.

A checkpoint is written into ``.tmp-checkpoint-<step>`` and renamed only once complete, so a
crash mid-write never leaves a folder that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from accelerate import Accelerator

from .errors import UserError

CHECKPOINTS = "checkpoints"
RUN_INFO = "run_info.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")

# Config fields that define the network, the diffusion process or the checkpoint's contents: a
# resume that changes any of them would load weights or state into something they don't fit.
ARCHITECTURE_FIELDS = (
    "model_preset",
    "class_conditional",
    "ddpm_num_steps",
    "ddpm_beta_schedule",
    "prediction_type",
    "use_ema",
)


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _NAME.match(name)
        path = os.path.join(root, name)
        if match and os.path.isfile(os.path.join(path, RUN_INFO)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """The checkpoint folder to resume from: None to start fresh."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        raise UserError(f"--resume_from_checkpoint {path} does not exist; pass 'latest' or a folder under {checkpoints_root(output_dir)}")
    if not os.path.isfile(os.path.join(path, RUN_INFO)):
        raise UserError(f"--resume_from_checkpoint {path} is not a complete ddpm-hf checkpoint (no {RUN_INFO})")
    return path


def read_run_info(path: str) -> dict:
    with open(os.path.join(path, RUN_INFO)) as f:
        return json.load(f)


def check_compatible(saved: dict, training_config: dict, unet_config: dict) -> None:
    """Refuse to resume into a different network or diffusion process than the checkpoint's."""
    differences = [
        f"{name}: checkpoint {saved['training_config'].get(name)!r}, now {training_config.get(name)!r}"
        for name in ARCHITECTURE_FIELDS
        if saved["training_config"].get(name) != training_config.get(name)
    ]
    saved_unet = json.loads(json.dumps(saved["unet_config"]))
    current_unet = json.loads(json.dumps(unet_config))  # tuples -> lists, as stored
    differences += [
        f"unet.{key}: checkpoint {saved_unet.get(key)!r}, now {current_unet.get(key)!r}"
        for key in sorted(set(saved_unet) | set(current_unet))
        if saved_unet.get(key) != current_unet.get(key)
    ]
    if differences:
        raise UserError(
            "cannot resume: the checkpoint was trained with a different architecture or schedule ("
            + "; ".join(differences)
            + "); resume with the checkpoint's settings or start a new --output_dir"
        )


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, run_info: dict, total_limit: int | None) -> str:
    """Save the full training state for ``step``; every process must call this."""
    root = checkpoints_root(output_dir)
    final = os.path.join(root, f"checkpoint-{step}")
    partial = os.path.join(root, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a crash during an earlier attempt at this step
        os.makedirs(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(partial, RUN_INFO), "w") as f:
            json.dump({**run_info, "step": step}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # re-saving the same step (a resumed run that ends where it began)
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
