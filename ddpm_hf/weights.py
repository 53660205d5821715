"""Which weights of a run to sample: the main EMA (the pipeline at the run's root), the raw weights,
or another EMA length kept with --extra_ema_decays. Each choice is a complete pipeline folder;
``weights.json`` at the root names them. No torch here: the commands check --weights before loading it."""

from __future__ import annotations

import json
import os

from .errors import UserError

WEIGHTS_DIR = "weights"
WEIGHTS_INDEX = "weights.json"
RAW = "raw"


def ema_name(decay: float) -> str:
    """The choice's name for an EMA capped at ``decay``: ema-0.9999."""
    return f"ema-{decay:g}"


def weights_index(default: str, others: list[str]) -> dict:
    """weights.json: the root's own choice and where every choice's pipeline is, relative to the root."""
    return {"default": default, "choices": {default: ".", **{name: f"{WEIGHTS_DIR}/{name}" for name in others}}}


def resolve_weights(model: str, name: str | None) -> str:
    """The pipeline folder of choice ``name`` in the run folder ``model`` (``model`` itself for None)."""
    if name is None:
        return model
    try:
        with open(os.path.join(model, WEIGHTS_INDEX)) as f:
            choices = json.load(f)["choices"]
    except (OSError, ValueError, KeyError):
        choices = {}
    if name not in choices:
        known = ", ".join(choices) if choices else "none: it has only its main weights (train with --extra_ema_decays to keep more)"
        raise UserError(f"--weights {name!r} is not a choice of {model}; its choices are {known}")
    return os.path.normpath(os.path.join(model, choices[name]))


def run_folders(model: str) -> list[str]:
    """Where a pipeline folder's run keeps its own files (training_config.json, guide/): the folder
    itself, then the one and two above it (for best/ and weights/<choice>/), nearest first."""
    return [os.path.normpath(os.path.join(model, *[os.pardir] * up)) for up in range(3)]
