"""Replayable randomness: every random draw of a run comes from a named stream.

A seed is derived from (stream, seed, further integers such as step and micro-batch). Each
stream below draws one kind of randomness and is the first component of each of its seeds, so
no two streams can share a seed; the comment says what its integers are. A new kind of
randomness gets a new stream here, never a reused one.
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
    LIKELIHOOD_NOISE = 12  # (seed, image index, t): the eps of one term of one image's bits/dim
    LIKELIHOOD_TIMESTEPS = 13  # (seed): the stratified timesteps of a bits/dim estimate


def derive_seed(stream: Stream, seed: int, *parts: int) -> int:
    """A well-mixed 64-bit seed for ``stream`` at (seed, *parts).

    numpy's SeedSequence hashes a list of 32-bit words, but treats trailing zeros as absent
    ([a, b] and [a, b, 0] give one seed) and splits an integer of 2**32 or more into two words,
    so raw tuples of different lengths can collide: the old (seed, 3, i) of sampling was training
    step 3's micro-batch i. Here the words are (stream, count of integers, seed, *parts), each
    integer one word: two different calls always hash two different word sequences."""
    words = [int(stream), 1 + len(parts), seed, *parts]
    if not all(isinstance(w, int) and 0 <= w < 2**32 for w in words):
        raise ValueError(f"seed parts must be integers in [0, 2**32), got {(seed, *parts)}")
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])


def generator(stream: Stream, seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded for ``stream`` at (seed, *parts)."""
    return torch.Generator(device).manual_seed(derive_seed(stream, seed, *parts))
