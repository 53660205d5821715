"""Replayable randomness: every random draw of a run comes from a named stream.

A seed is derived from (stream, seed, further integers such as step and micro-batch). Each
stream below draws one kind of randomness; the comment says what its integers are.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    MODEL_INIT = 1  # (seed): the initial weights, identical on every process
    DATA_ORDER = 2  # (seed, epoch): the order of an in-memory epoch
    STEP_NOISE = 3  # (seed, step, micro-batch): eps, flips and dropped labels of a global micro-batch
    TIMESTEPS = 4  # (seed, step, micro-batch): the timesteps of a global micro-batch
    DROPOUT = 5  # (seed, step, micro-batch, rank): dropout masks inside the network
    VALIDATION = 6  # (seed): the fixed (t, eps) of every validation example
    SAMPLING = 7  # (seed, image index): all the noise one drawn image uses
    NOISE_BASELINE = 8  # (seed): pure-noise images, the evaluation's floor
    INTERPOLATION = 9  # (seed): the end points of the interpolation grid
    DIAGNOSTICS = 10  # (seed): the noise of the forward-process strip
    COMPILE_CHECK = 11  # (seed): the synthetic batch of the torch.compile gradient check


def _sequence_seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1)[0])


def derive_seed(stream: Stream, seed: int, *parts: int) -> int:
    """The seed of ``stream`` at (seed, *parts): the seeds of the releases before named streams."""
    if stream == Stream.MODEL_INIT:
        return seed
    if stream == Stream.DATA_ORDER:
        return seed * 1_000_003 + parts[0]
    legacy = {
        Stream.STEP_NOISE: (seed, *parts),
        Stream.TIMESTEPS: (seed, *parts, 2),
        Stream.DROPOUT: (seed, *parts, 1),
        Stream.VALIDATION: (seed, 2**31 - 1),
        Stream.SAMPLING: (seed, 3, *parts),
        Stream.NOISE_BASELINE: (seed, 4),
        Stream.INTERPOLATION: (seed, 4, 1),
        Stream.DIAGNOSTICS: (seed, 2**31 - 2),
        Stream.COMPILE_CHECK: (seed,),
    }[stream]
    return _sequence_seed(*legacy) if stream != Stream.COMPILE_CHECK else seed


def generator(stream: Stream, seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded for ``stream`` at (seed, *parts)."""
    return torch.Generator(device).manual_seed(derive_seed(stream, seed, *parts))
