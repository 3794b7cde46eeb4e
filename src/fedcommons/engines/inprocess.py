"""A fast in-process engine for tests: the real ServerApp and ClientApp, no Ray, no network.

:class:`InProcessGrid` implements Flower's ``Grid`` by calling each node's ``ClientApp``
when its reply is pulled, with a deep copy of the message (as a transport would give).
It exists so unit tests drive the very same ``ServerApp``/``ClientApp`` objects as the
simulation and deployment engines, in milliseconds instead of seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedcommons.client_sdk.site_tasks import ALLOWED_TASKS_KEY
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.prepare import prepare_run
from fedcommons.coordinator.run import FederationResult, RunObserver
from fedcommons.coordinator.server_app import make_server_app
from fedcommons.errors import FedcommonsError

_SERVER_NODE_ID = 1


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ClientApp objects in this process."""

    def __init__(
        self,
        client_apps: Sequence[ClientApp],
        run_id: int = 1,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
        node_ids: Sequence[int] | None = None,
    ) -> None:
        self.run_id = run_id
        # Flower stamps messages with the identity of the task running in this process,
        # as its own simulation engine does for the Python API.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = _SERVER_NODE_ID
        self._nodes: dict[int, tuple[ClientApp, Context]] = {}
        if node_ids is not None and len(set(node_ids)) != len(client_apps):
            raise ValueError("node_ids must name each client app once")
        for pid, client in enumerate(client_apps):
            node_id = int(node_ids[pid]) if node_ids is not None else 1000 + pid
            node_config = {"partition-id": pid, "num-partitions": len(client_apps)}
            if node_configs is not None:  # the site's own node config (e.g. its DP budget)
                node_config.update(node_configs[pid])
            ctx = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config={},
            )
            self._nodes[node_id] = (client, ctx)
        self._inbox: dict[str, Message] = {}

    # Flower's abstract Grid API ----------------------------------------------------------
    def set_run(self, run_id: int) -> None:  # type: ignore[override]
        """Set the run id."""
        self.run_id = run_id

    @property
    def run(self):  # type: ignore[override]
        """Not tracked in process."""
        return None

    def create_message(  # type: ignore[override]
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Build a message like Flower's grids do."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Ids of the in-process nodes."""
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages; each is delivered when its reply is pulled."""
        ids = []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            msg.metadata.__dict__["_src_node_id"] = _SERVER_NODE_ID
            msg.metadata.__dict__["_run_id"] = self.run_id
            self._inbox[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the ClientApp of every queued message asked for and return the replies."""
        replies = []
        for msg_id in list(message_ids):
            msg = self._inbox.pop(msg_id, None)
            if msg is None:
                continue
            client, ctx = self._nodes[msg.metadata.dst_node_id]
            delivered = copy.deepcopy(msg)
            try:
                reply = client(delivered, ctx)
            except Exception as exc:  # a crashing ClientApp becomes an error reply
                from flwr.app import Error

                reply = Message(
                    Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered
                )
            replies.append(copy.deepcopy(reply))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push then pull everything."""
        return self.pull_messages(self.push_messages(messages))


def run_in_process(
    config: RunConfig,
    client_apps: Sequence[ClientApp],
    *,
    observer: RunObserver | None = None,
    node_configs: Sequence[Mapping[str, Any]] | None = None,
    node_ids: Sequence[int] | None = None,
) -> FederationResult:
    """Run ``config`` with the given ClientApps as institutions, in this process.

    ``node_configs`` (one mapping per app) is added to each node's config, as a site's
    ``flower-supernode --node-config`` would; ``node_ids`` (default 1000, 1001, ...) are
    the nodes' ids, e.g. random 64-bit ones as Flower's engines assign. The operator runs
    these sites, so each allows the run's task (``allowed-tasks``) unless its node config
    says otherwise.
    """
    config.task_options.setdefault("num-partitions", len(client_apps))
    if not config.population:
        config.population = len(client_apps)
    prepared = prepare_run(config)
    results: list[FederationResult] = []
    server_app = make_server_app(config, observer=observer, prepared=prepared, results=results)
    sites = [
        {ALLOWED_TASKS_KEY: config.task, **(node_configs[i] if node_configs else {})}
        for i in range(len(client_apps))
    ]
    grid = InProcessGrid(client_apps, node_configs=sites, node_ids=node_ids)
    context = Context(
        run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
    )
    server_app(grid, context)
    if not results:
        raise FedcommonsError("the in-process run ended without a result")
    return results[0]
