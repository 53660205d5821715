"""Replayable randomness: every random draw of a run is seeded from integers such as (seed, step, micro-batch)."""

import numpy as np


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers such as (seed, step, micro-batch)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
