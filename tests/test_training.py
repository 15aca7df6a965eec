"""models/training.py: the per-rank noise seeds."""

from __future__ import annotations

from models.training import noise_seed


def test_noise_seed_is_a_pure_function_distinct_per_rank_and_draw():
    seeds = {(r, d): noise_seed(7, r, d) for r in range(8) for d in range(200)}
    assert len(set(seeds.values())) == len(seeds)  # no two (rank, draw) pairs share a noise stream
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert noise_seed(7, 3, 5) == seeds[(3, 5)] and noise_seed(8, 3, 5) != seeds[(3, 5)]
    assert noise_seed(-1, 0, 0) == noise_seed(2**64 - 1, 0, 0)  # any int seed works (taken mod 2^64)
