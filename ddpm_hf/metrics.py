"""What a run records about itself: the metrics file, smoothing, peak memory."""

from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch

METRICS_FILE = "metrics.jsonl"
VALIDATION_FILE = "validation.jsonl"
EVALUATION_FILE = "evaluation.jsonl"


class MetricsLog:
    """``output_dir/metrics.jsonl`` (or another name): one JSON object per row, easy to open or load with pandas."""

    def __init__(self, output_dir: str, name: str = METRICS_FILE):
        self.path = os.path.join(output_dir, name)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows the interrupted run logged after its last checkpoint: they are redone.
        A log the run never wrote (validation or evaluation switched off) is not created."""
        if not os.path.isfile(self.path):
            return
        kept = [row for row in self.read() if row["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing).

    By default the window is about a tenth of the series (weight 1 - 10/n, at most 0.99): a fixed
    0.9 over a short run's few logging points drags the curve, and the "final" value, far back
    towards the early losses.
    """
    if weight is None:
        weight = min(0.99, max(0.0, 1 - 10 / max(len(values), 1)))
    smoothed, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**i))
    return smoothed


def smooth_without_lag(values: list[float]) -> list[float]:
    """`smooth` run forwards and then backwards over its own output (a zero-phase filter), in log
    space when every value is positive.

    A causal average of a falling curve trails it: early in a run, when the loss halves every
    few logging intervals, the forward average alone sat twice as high as the loss it smooths.
    The backward pass cancels that lag, and in log space the exponential-like early fall is
    averaged symmetrically, so the curve follows the loss; at the last point the backward pass
    has only that point, so the final value is the forward average's, which trails nothing once
    the loss has levelled off."""
    if not values:
        return []
    positive = all(v > 0 for v in values)
    series = [math.log(v) for v in values] if positive else list(values)
    weight = min(0.99, max(0.0, 1 - 10 / len(series)))
    both_ways = smooth(smooth(series, weight)[::-1], weight)[::-1]
    return [math.exp(v) for v in both_ways] if positive else both_ways


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory of this process and what was measured: CUDA max allocated, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    return (rss if sys.platform == "darwin" else rss * 1024), "peak_rss"
