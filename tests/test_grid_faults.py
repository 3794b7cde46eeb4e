"""What the round engine does when the Grid (the SuperLink) or the process itself fails.

In-process engine, with a Grid whose calls fail the way Flower's ServerApp reports a
SuperLink in trouble (``httpx.HTTPStatusError`` 500 "database is locked", found by the
chaos soak, ``benchmarks/chaos.py``), and a round interrupted by SIGINT (what Flower's
ServerApp raises on itself when its SuperExec or the SuperLink goes away).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError
from flwr.supercore.run import RunNotRunningException

from fedcommons.client_sdk.client_app import app as honest_client
from fedcommons.client_sdk.client_app import train as honest_train
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.prepare import prepare_run
from fedcommons.coordinator.run import FederationResult
from fedcommons.coordinator.runs import RunStore
from fedcommons.coordinator.server_app import make_server_app
from fedcommons.engines.inprocess import InProcessGrid, run_in_process
from fedcommons.errors import RoundFailedError
from fedcommons.observability import audit_log
from fedcommons.wire import keys


def _config(registry: Path, **over: object) -> RunConfig:
    flat: dict[str, object] = {
        "rounds": 2,
        "local-epochs": 1,
        "registry": str(registry),
        "run-name": "r1",
        "task.num-partitions": 2,
    }
    flat.update(over)
    return RunConfig.from_flat(flat)


def _locked(path: str) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", f"http://127.0.0.1:9093/v1/runtime/{path}")
    response = httpx.Response(500, request=request, text="database is locked")
    return httpx.HTTPStatusError(
        "Server error '500 Internal Server Error'", request=request, response=response
    )


class FlakyGrid(InProcessGrid):
    """Fails the first ``failures`` calls of each Grid method with HTTP 500, then works."""

    def __init__(self, apps: list[ClientApp], failures: int) -> None:
        super().__init__(apps)
        self.left = {"nodes": failures, "push": failures, "pull": failures}
        self.failed = 0

    def _maybe_fail(self, what: str, path: str) -> None:
        if self.left[what] > 0:
            self.left[what] -= 1
            self.failed += 1
            raise _locked(path)

    def get_node_ids(self) -> Iterable[int]:
        self._maybe_fail("nodes", "get-nodes")
        return super().get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        if self.left["push"] % 2:  # every other push failure: the objects were not stored
            self.left["push"] -= 1
            self.failed += 1
            raise ObjectPushError("6abca262", self.run_id, "session-1")
        self._maybe_fail("push", "push-messages")
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._maybe_fail("pull", "pull-messages")
        return super().pull_messages(message_ids)


def _run_on(grid: InProcessGrid, config: RunConfig) -> FederationResult:
    config.task_options.setdefault("num-partitions", 2)
    results: list[FederationResult] = []
    server_app = make_server_app(config, prepared=prepare_run(config), results=results)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server_app(grid, context)
    return results[0]


def test_transient_superlink_errors_are_retried_and_the_run_publishes(tmp_path: Path) -> None:
    """Input: the first 2 calls of get_node_ids, push_messages, pull_messages fail.

    HTTP 500 "database is locked", and for the push once Flower's ObjectPushError.
    """
    grid = FlakyGrid([honest_client] * 2, failures=2)
    result = _run_on(grid, _config(tmp_path / "reg"))
    assert grid.failed == 6
    assert [r.accepted for r in result.reports] == [2, 2]
    assert result.release.version == "1.0.0"


def test_superlink_that_keeps_failing_fails_the_round_not_silently(tmp_path: Path) -> None:
    """Input: push_messages always answers 500; round-timeout 1 s, no retries."""
    grid = FlakyGrid([honest_client] * 2, failures=10**6)
    grid.left["nodes"] = 0
    with pytest.raises(RoundFailedError, match="did not take the round's messages"):
        _run_on(grid, _config(tmp_path / "reg", **{"round-timeout": 1.0}))


def _interrupting_client(round_to_stop: int, signal: type[BaseException]) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(msg.content[keys.TRAIN_CONFIG][keys.ROUND]) == round_to_stop:
            raise signal  # arrives while the round collects replies
        return honest_train(msg, context)

    return app


@pytest.mark.parametrize("signal", [KeyboardInterrupt, RunNotRunningException])
def test_interrupted_coordinator_leaves_the_run_resumable(
    tmp_path: Path, signal: type[BaseException]
) -> None:
    """Input: SIGINT, or Flower's RunNotRunningException, in round 2 of 3; then a restart."""
    registry = tmp_path / "reg"
    with pytest.raises(signal):
        run_in_process(
            _config(registry, rounds=3), [honest_client, _interrupting_client(2, signal)]
        )
    record = RunStore(registry).get("r1")
    assert (record.state, record.committed_round) == ("running", 1)  # not "failed"
    result = run_in_process(_config(registry, rounds=3), [honest_client] * 2)
    assert RunStore(registry).get("r1").state == "finished"
    assert [c.round for c in RunStore(registry).rounds("r1")] == [1, 2, 3]
    ends = [
        r["outcome"] for r in audit_log.read(registry / "audit.jsonl") if r["action"] == "run.end"
    ]
    assert ends == ["interrupted", "finished"]
    assert result.release.manifest().config["run-name"] == "r1"
