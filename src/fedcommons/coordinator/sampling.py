"""Which nodes take part in a round: wait for the population, then sample it."""

from __future__ import annotations

import time

import numpy as np
from flwr.serverapp import Grid

from fedcommons.coordinator.prepare import PreparedRun
from fedcommons.errors import (
    RoundFailedError,
)
from fedcommons.logs import get_logger
from fedcommons.privacy.line import LinePrivacy

log = get_logger("fedcommons.coordinator")


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Return the connected node ids once at least ``minimum`` are there (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise RoundFailedError(
                f"only {len(nodes)} node(s) connected after {timeout:.0f}s; need {minimum}"
            )
        time.sleep(0.5)


def sample_nodes(nodes: list[int], k: int, seed: int, round_no: int, attempt: int = 0) -> list[int]:
    """Sample ``k`` nodes without replacement (all when ``k`` is 0 or too large).

    A retried round (``attempt`` > 0) draws a new sample; attempt 0 is the sample a
    resumed run draws again.
    """
    if k <= 0 or k >= len(nodes):
        return list(nodes)
    rng = np.random.default_rng([seed, round_no] if attempt == 0 else [seed, round_no, attempt])
    return sorted(int(n) for n in rng.choice(nodes, size=k, replace=False))


def sample_round(
    grid: Grid, prepared: PreparedRun, round_no: int
) -> tuple[LinePrivacy, list[int], list[int], float, float]:
    """Wait for nodes and sample the round's clients.

    Returns the line's privacy bookkeeping, the connected and the sampled nodes, the
    sample rate and the expected sample size (what ``privacy.start_round`` records).
    """
    config = prepared.config
    nodes = wait_for_nodes(grid, config.min_clients, config.node_wait_timeout)
    privacy = prepared.privacy or LinePrivacy(config.registry_path, config.line, None)
    if privacy.central is not None:  # DP-FedAvg: secret Poisson or fixed-size sampling
        sampled, rate, expected = privacy.sample(nodes, config.clients_per_round)
    else:
        sampled = sample_nodes(
            nodes, config.clients_per_round, config.seed, round_no, prepared.attempt
        )
        rate, expected = 1.0, float(len(sampled))
    return privacy, nodes, sampled, rate, expected
