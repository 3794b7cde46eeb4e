"""The warm ClientApp worker against a real SuperNode Runtime API (Flower's own server).

The harness serves Flower's SuperNode Runtime API (``flwr.supernode.main.create_app``)
on 127.0.0.1 from a real ``NodeState`` and stores runs, FABs, contexts, messages and
tasks the way ``flower-supernode`` does after pulling a message from the SuperLink; the
worker then acquires and serves the tasks over HTTP, as in ``--isolation process``.
"""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_object_tree, no_object_id_recompute
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeStateFactory
from flwr.supernode.start_client_internal import _insert_message

from fedcommons.client_sdk.warm import WarmWorker
from fedcommons.coordinator.config import RunConfig
from fedcommons.coordinator.intake import decode_reply
from fedcommons.coordinator.round import round_content
from fedcommons.tasks.digits import DigitsTask

NODE_ID = 7


def _fab(clientapp: str, files: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(
            "pyproject.toml",
            "\n".join(
                [
                    "[project]",
                    'name = "app"',
                    'version = "1.0.0"',
                    "[tool.flwr.app]",
                    'publisher = "tests"',
                    "[tool.flwr.app.components]",
                    'serverapp = "app.server:app"',
                    f'clientapp = "{clientapp}"',
                    "[tool.flwr.app.config]",
                ]
            ),
        )
        for name, text in (files or {}).items():
            archive.writestr(name, text)
    return buf.getvalue()


class RuntimeApi:
    """A SuperNode's state and Runtime API, without the SuperNode's Fleet connection."""

    def __init__(self) -> None:
        self.factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
        self.state = self.factory.state()
        self.store = self.factory.objectstore_factory.store()
        self.state.set_node_id(NODE_ID)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{s.getsockname()[1]}"
        config = uvicorn.Config(
            app=create_app(state_factory=self.factory),
            host="127.0.0.1",
            port=int(self.address.rsplit(":", 1)[1]),
            log_level="warning",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.started

    def add_task(
        self, run_id: int, content: RecordDict, fab: bytes, *, orphan_ttl: float | None = None
    ) -> Message:
        """Store run, FAB, context and a train message; create the ClientApp task.

        ``orphan_ttl``: store the message (with that TTL) the way flower-supernode does when
        its run ended while it pulled the message's objects: metadata and object tree, but
        the objects never arrive.
        """
        fab_hash = hashlib.sha256(fab).hexdigest()
        run = Run.create_empty(run_id)
        run.fab_id, run.fab_version, run.fab_hash, run.series_id = (
            "t/app",
            "1.0.0",
            fab_hash,
            run_id,
        )
        self.state.store_run(run)
        self.state.store_fab(Fab(fab_hash, fab, {}))
        node_config = {"partition-id": 0, "num-partitions": 2}
        context = Context(run_id, NODE_ID, node_config, RecordDict(), {}, series_id=run_id)
        self.state.set_run_series_context(run_id, context)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 1, 1
        ttl = orphan_ttl if orphan_ttl is not None else None
        message = Message(content, dst_node_id=NODE_ID, message_type="train", group_id="1", ttl=ttl)
        if orphan_ttl is None:
            _insert_message(message, self.state, self.store)
        else:
            with no_object_id_recompute():
                message.metadata.__dict__["_message_id"] = message.object_id
                self.state.store_message(message)
                self.store.preregister(run_id, get_object_tree(message))
        task_id = self.state.create_task(TaskType.CLIENT_APP, run_id=run_id, fab_hash=fab_hash)
        assert task_id is not None
        return message

    def reply_to(self, message: Message) -> Message:
        """The reply the worker pushed for ``message``."""
        replies = [
            r
            for r in self.state.get_messages_legacy(is_reply=True)
            if r.metadata.reply_to_message_id == message.metadata.message_id
        ]
        assert len(replies) == 1
        # the state holds the reply's metadata; its content is in the object store
        tree = self.store.get_object_tree(replies[0].metadata.message_id)
        reply = pull_and_inflate_object_from_tree(
            tree, lambda oid: self.store.get(oid), lambda _oid: None, return_type=Message
        )
        reply.metadata.__dict__["_message_id"] = tree.object_id
        return reply

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def runtime_api() -> Iterator[RuntimeApi]:
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    api = RuntimeApi()
    yield api
    api.close()
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


FEDCOMMONS_FAB = _fab("fedcommons.client_sdk.client_app:app")


def _serve_one(worker: WarmWorker) -> None:
    assert worker.serve(threading.Event(), max_tasks=1) == 1


def test_worker_trains_and_the_coordinator_accepts_its_reply(runtime_api: RuntimeApi) -> None:
    weights = DigitsTask().build_model().state_dict()
    content = round_content(RunConfig(local_epochs=1), weights, 1, "run-tag")
    sent = runtime_api.add_task(42, content, FEDCOMMONS_FAB)
    worker = WarmWorker(runtime_api.address)
    _serve_one(worker)
    assert worker.outcomes[-1].status == "completed"
    update = decode_reply(runtime_api.reply_to(sent), weights, 1)
    assert update.num_examples > 0
    assert any(float(d.abs().sum()) > 0 for d in update.delta.values())


def test_clientapp_exception_is_an_error_reply_and_the_worker_serves_on(
    runtime_api: RuntimeApi,
) -> None:
    """Input tried: a train message without its config record, then a good one."""
    worker = WarmWorker(runtime_api.address)
    bad = runtime_api.add_task(42, RecordDict({"config": ConfigRecord({})}), FEDCOMMONS_FAB)
    _serve_one(worker)
    reply = runtime_api.reply_to(bad)
    assert reply.has_error() and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    weights = DigitsTask().build_model().state_dict()
    good = runtime_api.add_task(43, round_content(RunConfig(), weights, 1), FEDCOMMONS_FAB)
    _serve_one(worker)  # the same warm process
    assert not runtime_api.reply_to(good).has_error()
    assert [o.status for o in worker.outcomes] == ["failed", "completed"]


def test_fab_that_ships_its_clientapp_code_gets_a_load_error_reply(
    runtime_api: RuntimeApi,
) -> None:
    """Input tried: a FAB carrying its own ClientApp package (myapp/client.py)."""
    fab = _fab("myapp.client:app", {"myapp/__init__.py": "", "myapp/client.py": "app = 1\n"})
    sent = runtime_api.add_task(44, RecordDict({"config": ConfigRecord({})}), fab)
    _serve_one(WarmWorker(runtime_api.address))
    reply = runtime_api.reply_to(sent)
    assert reply.has_error() and reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert "--mode subprocess" in reply.error.reason


def test_task_whose_message_never_arrives_is_dropped_at_its_ttl_and_the_worker_serves_on(
    runtime_api: RuntimeApi,
) -> None:
    """Input: a task of a run that ended while its SuperNode pulled the message (TTL 3 s)."""
    weights = DigitsTask().build_model().state_dict()
    content = round_content(RunConfig(local_epochs=1), weights, 1, "run-tag")
    runtime_api.add_task(41, content, FEDCOMMONS_FAB, orphan_ttl=3.0)
    worker = WarmWorker(runtime_api.address)
    started = time.monotonic()
    _serve_one(worker)
    assert worker.outcomes[-1].status == "failed"
    assert time.monotonic() - started < 60  # Flower's own pull would retry for 2 hours
    good = runtime_api.add_task(43, content, FEDCOMMONS_FAB)
    _serve_one(worker)
    assert not runtime_api.reply_to(good).has_error()


def test_fab_naming_another_installed_clientapp_is_refused_before_import(
    runtime_api: RuntimeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Input tried: clientapp = 'planted_app:app', installed, with an import side effect."""
    (tmp_path / "planted_app.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('IMPORTED').write_text('ran')\n"
        "from flwr.clientapp import ClientApp\napp = ClientApp()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sent = runtime_api.add_task(
        45, RecordDict({"config": ConfigRecord({})}), _fab("planted_app:app")
    )
    _serve_one(WarmWorker(runtime_api.address))
    reply = runtime_api.reply_to(sent)
    assert reply.has_error() and reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert "serves only fedcommons' ClientApp" in reply.error.reason
    assert not (tmp_path / "IMPORTED").exists()
