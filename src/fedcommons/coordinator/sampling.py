"""Which nodes take part in a round: wait for the population, then sample it.

Also the round engine's guard around Flower's ``Grid`` calls (:func:`grid_call`): the
SuperLink answers a transient failure (its SQLite state busy under load: HTTP 500
``database is locked``, an object push that could not be stored; a dropped connection)
with an exception, which Flower's ServerApp passes on. Such a call is retried with
backoff until the round's deadline instead of ending the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx
import numpy as np
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

from fedcommons.coordinator.prepare import PreparedRun
from fedcommons.errors import (
    RoundFailedError,
)
from fedcommons.logs import get_logger
from fedcommons.privacy.line import LinePrivacy

log = get_logger("fedcommons.coordinator")

T = TypeVar("T")


def transient_grid_error(exc: BaseException) -> bool:
    """Whether a ``Grid`` call failed in a way a retry may clear.

    HTTP 5xx/429 and transport errors, and Flower's ``ObjectPushError`` (the SuperLink
    could not store a message's objects, e.g. its database was locked).
    """
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, httpx.TransportError | ObjectPushError)


def grid_call(call: Callable[[], T], *, deadline: float, what: str) -> T:
    """``call()``, retried with backoff (0.2 s doubling to 5 s) on transient errors.

    Gives up at ``deadline`` (``time.monotonic()``) and re-raises the last error; any
    other exception passes through at once.
    """
    delay = 0.2
    while True:
        try:
            return call()
        except Exception as exc:
            if not transient_grid_error(exc) or time.monotonic() + delay >= deadline:
                raise
            log.warning(
                "grid.retry",
                call=what,
                retry_in_s=delay,
                error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            )
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Return the connected node ids once at least ``minimum`` are there (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(
            grid_call(lambda: list(grid.get_node_ids()), deadline=deadline, what="get_node_ids")
        )
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
