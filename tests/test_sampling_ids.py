"""Sampling keeps Flower's 64-bit node ids exact (no float64 round trip), with and without DP."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedcommons.coordinator.sampling import sample_nodes
from fedcommons.privacy.config import CentralDPConfig
from fedcommons.privacy.line import LinePrivacy

#: Ids as Flower's engines assign them: random unsigned 64-bit, many above 2**63.
IDS = [18_446_744_073_709_551_557, 9_223_372_036_854_775_817, 12_345_678_901_234_567_891, 7, 2**63]


def test_seeded_sample_returns_the_exact_python_int_ids() -> None:
    sample = sample_nodes(sorted(IDS), 3, seed=0, round_no=1)
    assert len(sample) == 3 and set(sample) <= set(IDS)
    assert all(type(n) is int for n in sample)


def test_dp_samples_return_the_exact_python_int_ids(tmp_path: Path) -> None:
    """Tried: Poisson and fixed-size DP sampling of ids ≥ 2**63."""
    for sampling in ("poisson", "fixed"):
        cfg = CentralDPConfig(
            noise_multiplier=1.0, clip_norm=1.0, epsilon=10, delta=1e-5, sampling=sampling
        )
        line = LinePrivacy(
            tmp_path, "l", cfg, rng=np.random.default_rng(3), clients_per_round=3, population=5
        )
        for _ in range(20):
            sample = line.sample(IDS)
            assert set(sample.nodes) <= set(IDS)
            assert all(type(n) is int for n in sample.nodes)
            if sampling == "fixed":
                assert len(sample.nodes) == 3 and sample.expected == 3.0
            else:
                assert sample.sample_rate == 0.6 and sample.expected == 3.0
