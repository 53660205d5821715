"""Resumable checkpoints: `accelerator.save_state` written atomically, rotated, found again, checked.

Layout: ``output_dir/checkpoints/checkpoint-<step>/`` holds what `accelerate` saves (model
weights in safetensors, optimizer, grad scaler, RNG states of every process) plus two files of
ours: ``custom_checkpoint_0.pkl``, the one object registered with accelerate, a `NamedState`
whose parts (progress, EMA, lr scheduler, timestep sampler, data position, early stopping) are
stored and found again by name; and ``run_info.json``: the training config and the resolved
UNet config, so a resume with another architecture or schedule is refused.

A checkpoint is written into ``.tmp-checkpoint-<step>``, flushed to disk, and renamed only once
complete, so a crash mid-write never leaves a folder that looks like a checkpoint. A resume
checks each candidate's files before loading it; an incomplete or corrupt one is reported and
skipped (never loaded, never deleted), and the next older one is tried.
"""

from __future__ import annotations

import json
import os
import re

import torch
from accelerate import Accelerator

from .errors import UserError, first_line
from .files import publish, remove, staging_path

CHECKPOINTS = "checkpoints"
RUN_INFO = "run_info.json"
TRAINING_STATE = "custom_checkpoint_0.pkl"  # where accelerate saves the one NamedState registered with it
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
    "extra_ema_decays",
    "guide_step",
)


class NamedState:
    """The training state beside the model and optimizer, saved and loaded by name.

    ``parts`` maps a name to an object with ``state_dict``/``load_state_dict``. Registered with
    `accelerator.register_for_checkpointing` as the only custom object, so accelerate's own
    save and load (and its per-process rules) carry it; nothing depends on registration order."""

    def __init__(self, **parts):
        self.parts = parts

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.parts) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's training state has no {', '.join(missing)}")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def read_training_state(checkpoint: str) -> dict:
    """A checkpoint's named training state, {name: state dict}, read without a model (for tools and tests)."""
    return torch.load(os.path.join(checkpoint, TRAINING_STATE), map_location="cpu", weights_only=False)


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` cannot be resumed from (missing, empty or unreadable files), or None if it looks whole."""
    try:
        read_run_info(path)
    except FileNotFoundError:
        return f"no {RUN_INFO} (an interrupted save)"
    except (OSError, ValueError) as e:
        return f"{RUN_INFO} is unreadable ({e})"
    names = set(os.listdir(path))
    weights = [n for n in names if n.startswith("model") and n.endswith((".safetensors", ".bin"))]
    if not weights:
        return "no model weights"
    required = ["optimizer.bin", "random_states_0.pkl", TRAINING_STATE]
    for name in required + weights:
        if name not in names:
            return f"{name} is missing"
        if os.path.getsize(os.path.join(path, name)) == 0:
            return f"{name} is empty"
    for name in weights:
        if name.endswith(".safetensors"):
            try:
                from safetensors import safe_open

                with safe_open(os.path.join(path, name), framework="pt") as f:
                    f.keys()
            except Exception as e:  # safetensors reports a truncated or garbled file in several ways
                return f"{name} is corrupt ({first_line(e)})"
    return None


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


def resume_candidates(resume_from_checkpoint: str | None, output_dir: str) -> tuple[list[str], list[str]]:
    """(checkpoint folders to try, newest first; reports of the ones skipped). Nothing to try: start fresh."""
    if resume_from_checkpoint is None:
        return [], []
    if resume_from_checkpoint != "latest":
        path = resume_from_checkpoint
        if not os.path.isdir(path):
            raise UserError(f"--resume_from_checkpoint {path} does not exist; pass 'latest' or a folder under {checkpoints_root(output_dir)}")
        problem = checkpoint_problem(path)
        if problem:
            raise UserError(f"--resume_from_checkpoint {path} cannot be resumed from: {problem}; pass 'latest' to take the newest complete one")
        return [path], []
    root = checkpoints_root(output_dir)
    if not os.path.isdir(root):
        return [], []
    candidates, skipped = [], []
    for name in sorted(os.listdir(root), key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else -1, reverse=True):
        path = os.path.join(root, name)
        if name.startswith(".tmp-checkpoint-"):
            skipped.append(f"skipping {path}: an incomplete save (it is replaced when that step is saved again)")
        elif _NAME.match(name):
            problem = checkpoint_problem(path)
            if problem:
                skipped.append(f"skipping {path}: {problem}; it is left as it is")
            else:
                candidates.append(path)
    return candidates, skipped


def read_run_info(path: str) -> dict:
    with open(os.path.join(path, RUN_INFO)) as f:
        return json.load(f)


def check_compatible(saved: dict, training_config: dict, unet_config: dict) -> None:
    """Refuse to resume into a different network or diffusion process than the checkpoint's."""
    # A field that an older version did not save had its default then: no EMA lengths beyond the main one, no guide.
    saved_config = {"extra_ema_decays": [], "guide_step": None, **saved["training_config"]}
    differences = [
        f"{name}: checkpoint {saved_config.get(name)!r}, now {training_config.get(name)!r}"
        for name in ARCHITECTURE_FIELDS
        if saved_config.get(name) != training_config.get(name)
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
    partial = staging_path(final)  # resume_candidates reports and skips these
    if accelerator.is_main_process:
        remove(partial)  # left by a crash during an earlier attempt at this step
        os.makedirs(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(partial)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(partial, RUN_INFO), "w") as f:
                json.dump({**run_info, "step": step}, f, indent=2)
            # Flushed, then renamed: replaces the same step's folder (a resumed run that ends where it began).
            publish(partial, final, durable=True)
    except Exception as e:  # a full disk shows up as OSError, or as safetensors' or torch's own error types
        remove(partial)
        previous = list_checkpoints(output_dir)
        kept = f"the newest complete checkpoint, {previous[-1][1]}, is intact" if previous else "no earlier checkpoint exists"
        raise UserError(f"could not write the checkpoint for step {step} in {root} ({first_line(e)}); {kept}; "
                        "free some disk space and run the same command with --resume_from_checkpoint latest") from None
    if accelerator.is_main_process and total_limit is not None:
        for _, old in list_checkpoints(output_dir)[:-total_limit]:
            remove(old)
    accelerator.wait_for_everyone()
    return final
