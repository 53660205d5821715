"""Stopping cleanly on SIGINT / SIGTERM: finish the step, write a checkpoint, say how to resume.

Pre-emptible machines and schedulers (SLURM, Kubernetes) send SIGTERM and wait a little before
SIGKILL; Ctrl-C sends SIGINT. Either only sets a flag: the loop checks it after each step, so a
step is never cut in half. A second Ctrl-C stops at once, the usual escape hatch.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

import torch

from .errors import UserError


class Interrupted(UserError):
    """Raised once the checkpoint is written; the exit status is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


class StopRequest:
    """The first SIGINT/SIGTERM received while the handlers are installed."""

    def __init__(self):
        self.signum: int | None = None

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = self.signum or signum

    def agreed(self, accelerator) -> int | None:
        """The signal, if any process got one: all processes must stop at the same step."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor(self.signum or 0, device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item()) or None


@contextmanager
def stop_on_signals():
    """Install the SIGINT/SIGTERM handlers for the duration of training; restore the previous ones after."""
    request = StopRequest()
    previous = {s: signal.signal(s, request._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
