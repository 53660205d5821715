"""Named seed streams: no two streams, and no two calls of one stream, share a seed."""

import itertools

import pytest

from ddpm_hf.seeds import Stream, derive_seed, generator


def test_distinct_streams_and_parts_never_collide_for_small_integers():
    seeds = {}
    for stream in Stream:
        for seed in range(3):
            for arity in range(4):
                for parts in itertools.product(range(4), repeat=arity):
                    seeds[(stream, seed, *parts)] = derive_seed(stream, seed, *parts)
    assert len(seeds) == len(Stream) * 3 * (1 + 4 + 16 + 64)
    assert len(set(seeds.values())) == len(seeds), "two different (stream, seed, parts) gave one seed"


def test_the_old_collisions_are_gone():
    # numpy's SeedSequence treats trailing zeros as absent: the old (0, 4) and (0, 4, 0) were one seed.
    assert derive_seed(Stream.STEP_NOISE, 0, 4) != derive_seed(Stream.STEP_NOISE, 0, 4, 0)
    # The old sampling seed of image i, (seed, 3, i), was training step 3's micro-batch i.
    assert derive_seed(Stream.SAMPLING, 0, 5) != derive_seed(Stream.STEP_NOISE, 0, 3, 5)
    # The old noise baseline, (seed, 4), was step 4's first micro-batch.
    assert derive_seed(Stream.NOISE_BASELINE, 0) != derive_seed(Stream.STEP_NOISE, 0, 4, 0)


def test_the_scheme_is_pinned():
    # A change of the derivation changes every run's numbers: it must be deliberate.
    assert derive_seed(Stream.STEP_NOISE, 0, 4) == 12680072475203890772
    assert derive_seed(Stream.STEP_NOISE, 0, 4, 0) == 15406728485729620335


def test_integers_that_do_not_fit_one_word_are_refused():
    # 2**32 would be split into the words (0, 1), the same as the parts (0, 1).
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        derive_seed(Stream.STEP_NOISE, 2**32)
    with pytest.raises(ValueError):
        derive_seed(Stream.STEP_NOISE, 0, -1)


def test_a_generator_replays_its_stream():
    import torch

    a, b = generator(Stream.SAMPLING, 7, 2), generator(Stream.SAMPLING, 7, 2)
    assert torch.equal(torch.randn(5, generator=a), torch.randn(5, generator=b))
    assert not torch.equal(torch.randn(5, generator=generator(Stream.SAMPLING, 7, 3)), torch.randn(5, generator=generator(Stream.SAMPLING, 7, 2)))
