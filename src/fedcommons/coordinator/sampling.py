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

And how a round pulls its replies without letting one unfinished upload hold the round
(:func:`pull_available`).

Flower 1.41's ``HttpGrid.pull_messages`` (the deployment engine's grid) takes the replies
the SuperLink has, which also removes them from the SuperLink, and then downloads each
reply's objects, waiting up to two hours per reply for objects that are not uploaded yet.
A SuperNode killed while uploading its reply leaves exactly that: a reply whose objects
never arrive. The pull then blocks until the SuperLink drops the upload (its object-push
session expires after 180 s), far past the round's deadline, and the replies of the
other nodes are never pulled: the round fails with "no reply" from nodes that replied
(found by ``benchmarks/chaos.py``: a 45 s round took 186 s and counted 5 of its 6 nodes
as "no reply").

:func:`pull_available` does the same calls with a bound: each reply's objects get at most
``slice_s`` seconds per poll (never past the round's deadline); a reply whose objects are
still missing is kept here and tried again at the next poll, so the other replies keep
flowing, and at the deadline it counts as not received. A reply whose objects the
SuperLink no longer has becomes an error reply, as in Flower. Other grids (the
in-process engine, simulation) are pulled with their own ``pull_messages``.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np
from flwr.app import Message, Metadata
from flwr.app.error import Error
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
from flwr.proto.runtime_pb2 import PullAppMessagesRequest
from flwr.serverapp import Grid
from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectPushError,
    inflate_object_from_contents,
    pull_objects,
)
from flwr.superlink.grid.http_grid import HttpGrid

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


# -- pulling a round's replies ------------------------------------------------------

#: Seconds a reply's objects may take per poll before the other replies get their turn.
SLICE_S = 2.0


@dataclass
class _Partial:
    """A reply taken from the SuperLink whose objects were not all downloaded yet."""

    proto: Any  # flwr.proto.message_pb2.Message
    tree: Any  # flwr.proto.message_pb2.ObjectTree
    since: float


#: grid -> {instruction message id: reply still downloading}
_PARTIAL: weakref.WeakKeyDictionary[Grid, dict[str, _Partial]] = weakref.WeakKeyDictionary()


def pull_available(
    grid: Grid, pending: set[str], deadline: float | None = None, *, slice_s: float = SLICE_S
) -> list[Message]:
    """The replies to the instruction messages ``pending`` that can be had now.

    ``deadline`` (``time.monotonic()``) bounds the object downloads on the deployment
    engine; without one, each reply gets ``slice_s`` seconds.
    """
    if not isinstance(grid, HttpGrid):
        return list(grid.pull_messages(list(pending)))
    partial = _PARTIAL.setdefault(grid, {})
    for gone in set(partial) - pending:  # an earlier round's, or already counted
        del partial[gone]
    asked = [i for i in pending if i not in partial]
    if asked:
        res = grid._runtime_client.PullMessages(PullAppMessagesRequest(message_ids=asked))
        for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True):
            partial[proto.metadata.reply_to_message_id] = _Partial(proto, tree, time.monotonic())
    replies: list[Message] = []
    for reply_to in list(partial):
        budget = slice_s if deadline is None else min(slice_s, deadline - time.monotonic())
        try:
            message = _download(grid, partial[reply_to], max(budget, 0.05))
        except Exception:
            if not replies:
                raise
            break  # keep what was downloaded; the rest stays for the next poll
        if message is not None:
            del partial[reply_to]
            replies.append(message)
    return replies


def _download(grid: HttpGrid, item: _Partial, budget: float) -> Message | None:
    """The reply with its objects; an error reply if they are gone; None if still missing."""
    run_id = grid._run.run_id  # type: ignore[union-attr]
    msg_id = item.proto.metadata.message_id
    fetch = make_pull_object_fn_protobuf(
        pull_object_protobuf=grid._runtime_client.PullObject, node=grid.node, run_id=run_id
    )
    gone: list[str] = []

    def pull_one(object_id: str) -> bytes:
        try:
            return fetch(object_id)
        except ObjectPullError:  # the SuperLink no longer has it: final
            gone.append(object_id)
            raise

    try:
        contents = pull_objects(
            [t.object_id for t in iterate_object_tree(item.tree)],
            pull_one,
            max_time=budget,
            max_tries_per_object=None,
            initial_backoff=0.2,
            backoff_cap=1.0,
        )
    except ObjectPullError as exc:
        if not gone:  # not uploaded yet: try again at the next poll
            log.info(
                "round.reply_incomplete",
                reply_to=item.proto.metadata.reply_to_message_id,
                waiting_s=round(time.monotonic() - item.since, 1),
            )
            return None
        return _unavailable(run_id, grid, item, str(exc))
    grid._runtime_client.ConfirmMessageReceived(
        ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id, message_object_id=msg_id)
    )
    message = inflate_object_from_contents(msg_id, contents)
    message.metadata.__dict__["_message_id"] = msg_id
    return message  # type: ignore[return-value]


def _unavailable(run_id: int, grid: HttpGrid, item: _Partial, detail: str) -> Message:
    """The error reply Flower makes for a reply whose objects cannot be pulled."""
    return make_message(
        metadata=Metadata(
            run_id=run_id,
            message_id="",
            src_node_id=item.proto.metadata.src_node_id,
            dst_node_id=grid.node.node_id,
            message_type=SYSTEM_MESSAGE_TYPE,
            group_id="",
            ttl=0,
            reply_to_message_id=item.proto.metadata.reply_to_message_id,
            created_at=now().timestamp(),
        ),
        error=Error(
            code=ErrorCode.MESSAGE_UNAVAILABLE,
            reason=f"Reply message objects are unavailable (upload not completed): {detail}",
        ),
    )
