"""Which nodes take part in a round: wait for the population, then sample it.

Flower's node ids are unsigned 64-bit integers. They stay Python ints end to end: samples
are drawn as *indices* into the sorted id list, never by handing the ids to numpy (a
list with an id ≥ 2⁶³ becomes a float64 array, and the rounded ids address nodes that do
not exist: "Invalid destination node ID").

Also the round engine's guard around Flower's ``Grid`` calls (:func:`grid_call`): the
SuperLink answers a transient failure (its SQLite state busy under load: HTTP 500
``database is locked``, an object push that could not be stored; a dropped connection)
with an exception, which Flower's ServerApp passes on. Such a call is retried with
backoff until the round's deadline instead of ending the run.

How a round pulls its replies without letting one unfinished upload hold the round is
:func:`fedcommons.coordinator.intake.pull_replies`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx
import numpy as np
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPushError,
)

from fedcommons.coordinator.prepare import PreparedRun
from fedcommons.errors import RoundFailedError
from fedcommons.logs import get_logger
from fedcommons.privacy.line import LinePrivacy, RoundSample

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


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, population: int = 0) -> list[int]:
    """The connected node ids (sorted Python ints), once the declared population is there.

    Waits until ``population`` nodes (at least ``minimum``) are connected, at most
    ``timeout`` seconds. At the deadline a round with at least ``minimum`` nodes goes on
    with those (a warning names the shortfall; the round report records how many were
    connected); fewer raise :class:`RoundFailedError`.
    """
    target = max(minimum, population)
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(
            int(n)
            for n in grid_call(
                lambda: list(grid.get_node_ids()), deadline=deadline, what="get_node_ids"
            )
        )
        if len(nodes) >= target:
            return nodes
        if time.monotonic() >= deadline:
            if len(nodes) >= minimum:
                log.warning("round.population_short", connected=len(nodes), declared=target)
                return nodes
            raise RoundFailedError(
                f"only {len(nodes)} node(s) connected after {timeout:.0f}s; need {minimum} "
                f"(declared population {population or 'none'})"
            )
        time.sleep(0.2)


def sample_nodes(nodes: list[int], k: int, seed: int, round_no: int, attempt: int = 0) -> list[int]:
    """Sample ``k`` of ``nodes`` without replacement (all when ``k`` is 0 or too large).

    Seeded by the run's seed and the round (the same sample when a resumed run draws it
    again); a retried round (``attempt`` > 0) draws a new one. Returns Python ints.
    """
    if k <= 0 or k >= len(nodes):
        return list(nodes)
    rng = np.random.default_rng([seed, round_no] if attempt == 0 else [seed, round_no, attempt])
    picks = rng.choice(len(nodes), size=k, replace=False)
    return sorted(nodes[int(i)] for i in picks)


def sample_round(
    grid: Grid, prepared: PreparedRun, round_no: int
) -> tuple[LinePrivacy, list[int], RoundSample]:
    """Wait for the declared population, then sample the round's clients.

    The round waits (at most ``node-wait-timeout``) until the declared ``population`` is
    connected, then goes on with whoever is (at least ``min-clients``). Without central
    DP the sample is seeded from the run's seed; with it, the line's privacy bookkeeping
    draws a secret Poisson or fixed-size sample whose rate and denominator depend only on
    the declared population.
    """
    config = prepared.config
    nodes = wait_for_nodes(grid, config.min_clients, config.node_wait_timeout, config.population)
    privacy = prepared.privacy or LinePrivacy(config.registry_path, config.line, None)
    if privacy.central is not None:
        return privacy, nodes, privacy.sample(nodes)
    sampled = sample_nodes(nodes, config.clients_per_round, config.seed, round_no, prepared.attempt)
    return privacy, nodes, RoundSample(sampled, 1.0, float(len(sampled)))
