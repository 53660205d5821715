"""Fault injection for the tests that exercise the non-finite guard through the real command line.

``DDPM_HF_FAULT_NONFINITE_STEPS=1,5`` makes the training loss of steps 1 and 5 (counted from 0)
NaN. Unset in normal use, and then nothing here is installed: the training step never checks."""

from __future__ import annotations

import os

import torch

FAULT_VARIABLE = "DDPM_HF_FAULT_NONFINITE_STEPS"


class NonfiniteLossAtSteps:
    """Wraps an objective: at the listed steps the training loss is NaN (validation, which runs
    without gradients, is left alone)."""

    def __init__(self, objective, steps: set[int], progress):
        self.objective, self.steps, self.progress = objective, steps, progress

    def losses(self, *args, **kwargs) -> torch.Tensor:
        losses = self.objective.losses(*args, **kwargs)
        if self.progress.step in self.steps and torch.is_grad_enabled():
            return losses * float("nan")
        return losses

    def __getattr__(self, name):
        return getattr(self.objective, name)


def with_injected_faults(objective, progress):
    """``objective`` itself, or wrapped when the fault variable asks for NaN steps."""
    steps = {int(s) for s in os.environ.get(FAULT_VARIABLE, "").split(",") if s.strip()}
    return NonfiniteLossAtSteps(objective, steps, progress) if steps else objective
