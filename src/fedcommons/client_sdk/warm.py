"""A warm ClientApp executor for a SuperNode started with ``--isolation process``.

Flower 1.41 runs every message a SuperNode receives in a fresh ``flwr-clientapp``
process (``--isolation subprocess``, the default: the SuperNode's ``flower-superexec``
starts one per task). Each such process pays Python start-up, ``import torch`` (and
``torch._dynamo``, which the first optimiser pulls in), scikit-learn, flwr, the FAB
install and the data set load: on a shared 2-core machine that is most of a round.

``--isolation process`` is Flower's supported way to run ClientApps outside the
SuperNode: an external executor acquires tasks from the SuperNode's Runtime API
(``AcquireTask``) and serves each with the task's token (``PullTaskInput``,
``PullMessages``, ``PushMessages``, ``PushTaskOutput``, task heartbeats) — what
``flower-superexec`` plus ``flwr-clientapp`` do. :class:`WarmWorker` is such an
executor that stays up: it imports the ClientApp (and warms the site's task: data set,
model, optimiser) once, then runs each task in this process with Flower's own Runtime
API client functions. Errors raised by the ClientApp become Flower ``Error`` replies,
as in ``flwr-clientapp``; the process keeps serving.

Only fedcommons' own ClientApp runs warm (the fedcommons FAB holds no code and names
``fedcommons.client_sdk.client_app:app``): a FAB that names any other ClientApp, or
ships its own ClientApp module, is answered with an error and nothing is imported, so a
coordinator cannot choose what code this process imports. ``--mode subprocess`` runs any
FAB in a fresh process as Flower does (code chosen by whoever submitted the run).

Run by ``fedcommons client join`` (see :mod:`fedcommons.client_sdk.node`); by hand:
``python -m fedcommons.client_sdk.warm --runtime-api-address 127.0.0.1:9094``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcommons.errors import FedcommonsError
from fedcommons.logs import configure_logging, get_logger
from fedcommons.memory import map_large_blocks, release_freed_memory

log = get_logger("fedcommons.client.warm")

#: The fedcommons ClientApp, imported before the first task arrives.
DEFAULT_CLIENTAPP_REF = "fedcommons.client_sdk.client_app:app"
#: Seconds between ``AcquireTask`` polls of the SuperNode's Runtime API.
DEFAULT_POLL_INTERVAL = 0.1
#: Shortest wait for a task's message objects, even when its TTL has (nearly) run out.
MIN_PULL_S = 5.0


class WarmWorkerError(FedcommonsError):
    """The warm ClientApp worker cannot run as asked (bad address, unusable app)."""


class NotWarmableAppError(WarmWorkerError):
    """The run's ClientApp is not installed on this node (its code ships in the FAB)."""


@dataclass
class TaskOutcome:
    """What one task did: its ids, status, and where its seconds went."""

    task_id: int
    run_id: int = 0
    status: str = "failed"
    details: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def _runtime_client(address: str, token: str | None, root_certificates: str | None) -> Any:
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker() if token is not None else None,
    )


def _fab_clientapp_ref(fab_content: bytes) -> str:
    """The ``clientapp`` component a FAB's ``pyproject.toml`` names."""
    from flwr.common.config import get_fab_config

    config = get_fab_config(fab_content)
    return str(config["tool"]["flwr"]["app"]["components"]["clientapp"])


def _fab_modules(fab_content: bytes) -> set[str]:
    """Top-level module and package names of the Python files a FAB ships."""
    import io
    import zipfile

    names: set[str] = set()
    with zipfile.ZipFile(io.BytesIO(fab_content)) as archive:
        for name in archive.namelist():
            if name.endswith(".py"):
                names.add(name.split("/", 1)[0].removesuffix(".py"))
    return names


class WarmWorker:
    """Serve a SuperNode's ClientApp tasks from one long-lived process.

    ``preload`` runs once before the first poll (import the app, warm the task's data);
    a failure there is logged, not fatal: the first task then pays the cost. Tasks run
    one at a time, as a SuperNode hands out one message at a time.
    """

    def __init__(
        self,
        runtime_api_address: str,
        *,
        root_certificates: str | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        preload: Callable[[], None] | None = None,
    ) -> None:
        if not runtime_api_address or ":" not in runtime_api_address:
            raise WarmWorkerError(
                f"runtime API address must be HOST:PORT, got {runtime_api_address!r}"
            )
        if not 0.01 <= poll_interval <= 60:
            raise WarmWorkerError(f"poll interval must be in [0.01, 60] s, got {poll_interval}")
        self.address = runtime_api_address
        self.root_certificates = root_certificates
        self.poll_interval = poll_interval
        self.preload = preload
        #: The most recent tasks' outcomes (bounded: the worker runs for months).
        self.outcomes: deque[TaskOutcome] = deque(maxlen=1000)
        self._apps: dict[str, Any] = {}

    # -- the loop -------------------------------------------------------------------
    def serve(self, stop: threading.Event, *, max_tasks: int | None = None) -> int:
        """Acquire and run tasks until ``stop`` is set (or ``max_tasks`` ran); return count."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        if self.preload is not None:
            started = time.perf_counter()
            try:
                self.preload()
                log.info("warm.preloaded", seconds=round(time.perf_counter() - started, 3))
            except Exception as exc:  # the first task pays instead; never fatal
                log.warning("warm.preload-failed", detail=f"{type(exc).__name__}: {exc}")
        client = _runtime_client(self.address, None, self.root_certificates)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        served, waiting_since, warned = 0, time.monotonic(), False
        try:
            while not stop.is_set() and (max_tasks is None or served < max_tasks):
                try:
                    response = client.AcquireTask(request)
                except Exception as exc:  # the SuperNode is starting or restarting
                    if not warned and time.monotonic() - waiting_since > 10:
                        log.warning(
                            "warm.runtime-api-unreachable",
                            address=self.address,
                            detail=str(exc)[:200],
                        )
                        warned = True
                    stop.wait(min(1.0, self.poll_interval * 5))
                    continue
                waiting_since, warned = time.monotonic(), False
                if response.HasField("task") and response.token:
                    try:
                        self.run_task(response.token, response.task.task_id)
                    except Exception as exc:  # the Runtime API failed us: serve on
                        log.error("warm.task-aborted", detail=f"{type(exc).__name__}: {exc}")
                    served += 1
                    continue  # the next message may already wait
                stop.wait(self.poll_interval)
        finally:
            client.close()
        return served

    # -- one task -------------------------------------------------------------------
    def run_task(self, token: str, task_id: int) -> TaskOutcome:
        """Run one ClientApp task with its token, as ``flwr-clientapp`` would."""
        from flwr.app import Error, Message
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        outcome = TaskOutcome(task_id=task_id)
        clock = time.perf_counter()
        client = _runtime_client(self.address, token, self.root_certificates)
        cancelled = threading.Event()
        heartbeat = HeartbeatSender(_heartbeat_fn(client, cancelled))
        message = context = reply = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            outcome.run_id = int(run.run_id)
            outcome.seconds["pull"] = time.perf_counter() - clock
            app = self.load_app(fab.content, fab.hash_str)
            outcome.seconds["load"] = time.perf_counter() - clock - outcome.seconds["pull"]
            reply = app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # reported to the coordinator, as flwr-clientapp does
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = f"{type(exc)}:<'{exc}'>"
            if isinstance(exc, LoadClientAppError | NotWarmableAppError):
                code, reason = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, str(exc)
            log.error("warm.task-failed", task_id=task_id, detail=reason[:500])
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            ran = time.perf_counter()
            if reply is not None and context is not None and not cancelled.is_set():
                try:
                    push_message(client, reply, context)
                except Exception as exc:
                    log.error("warm.push-failed", task_id=task_id, detail=str(exc)[:300])
                    sub_status, details = SubStatus.FAILED, f"push failed: {exc}"
            push_task_output(client, context, sub_status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            outcome.seconds["push"] = time.perf_counter() - ran
            outcome.seconds["total"] = time.perf_counter() - clock
            del message, reply
            release_freed_memory()  # between tasks the worker should hold no model
        outcome.status, outcome.details = str(sub_status), details
        self.outcomes.append(outcome)
        log.info(
            "warm.task",
            task_id=task_id,
            run_id=outcome.run_id,
            status=outcome.status,
            **{f"{k}_s": round(v, 3) for k, v in outcome.seconds.items()},
        )
        return outcome

    def load_app(self, fab_content: bytes, fab_hash: str) -> Any:
        """The FAB's ClientApp object, imported from this node's installed packages."""
        from flwr.clientapp.client_app import ClientApp, LoadClientAppError

        if fab_hash in self._apps:
            return self._apps[fab_hash]
        try:
            ref = _fab_clientapp_ref(fab_content)
        except Exception as exc:
            raise LoadClientAppError(f"the FAB names no clientapp component: {exc}") from exc
        if ref != DEFAULT_CLIENTAPP_REF:  # checked before anything is imported
            raise NotWarmableAppError(
                f"the run asks for ClientApp {ref!r}; this node's warm worker serves only "
                f"fedcommons' ClientApp ({DEFAULT_CLIENTAPP_REF}); an institution that wants to "
                "run other apps joins with 'fedcommons client join --mode subprocess'"
            )
        app = load_installed_app(ref, shipped=_fab_modules(fab_content))
        if not isinstance(app, ClientApp):
            raise LoadClientAppError(f"{ref} is not a flwr ClientApp ({type(app).__name__})")
        self._apps[fab_hash] = app
        return app


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """Flower's ``pull_task_input``, with the message pull bounded by the message's TTL.

    A SuperNode creates a task before it has pulled the message's objects from the
    SuperLink; when that pull fails because the run ended (its ServerApp died), Flower
    1.41 logs "Ignoring message" but leaves the task in its state with objects that never
    arrive. Flower's pull would then retry for up to two hours
    (``PULL_MAX_TIME``) — harmless in ``flwr-clientapp``'s one process per task, but it
    would stall this worker, and every later round of this institution, behind a dead
    message. A message past its TTL gets no reply anyway, so the pull gives up then.
    """
    from flwr.app import Context, Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context: Context = context_from_proto(res.context)
    run, fab = run_from_proto(res.run), fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    meta = pulled.messages_list[0].metadata
    remaining = meta.created_at + meta.ttl - time.time() if meta.ttl > 0 else None
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        max_time=None if remaining is None else max(MIN_PULL_S, remaining),
    )
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def load_installed_app(ref: str, *, shipped: set[str] | frozenset[str] = frozenset()) -> Any:
    """Import ``module:attr`` from the installed packages (never from a FAB).

    Raises :class:`NotWarmableAppError` when the module's top-level package is one the
    FAB ships (``shipped``) or cannot be found here.
    """
    module_name, _, attrs = ref.partition(":")
    if not module_name or not attrs:
        raise WarmWorkerError(f"ClientApp reference must be 'module:attribute', got {ref!r}")
    top = module_name.split(".", 1)[0]
    hint = "join with 'fedcommons client join --mode subprocess' to run FABs that ship code"
    if top in shipped:
        raise NotWarmableAppError(
            f"the run's FAB ships its own ClientApp code ({top!r}); warm mode runs only "
            f"ClientApps installed on this node: {hint}"
        )
    if module_name not in sys.modules and importlib.util.find_spec(top) is None:
        raise NotWarmableAppError(f"ClientApp module {module_name!r} is not installed: {hint}")
    target: Any = importlib.import_module(module_name)
    for attr in attrs.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError as exc:
            raise WarmWorkerError(f"{module_name!r} has no attribute {attrs!r}") from exc
    return target


def _heartbeat_fn(client: Any, cancelled: threading.Event) -> Callable[[], bool]:
    """Flower's task heartbeat, except that a refused task is flagged, not SIGINT'ed.

    (``flwr-clientapp`` ends its own process when the SuperNode refuses a heartbeat; a
    warm worker must survive it and only drop that task's reply.)
    """
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (503, 504):
                return False
            cancelled.set()  # the SuperNode no longer knows this task
            return True
        if not response.success:
            cancelled.set()
        return True

    return beat


def task_preloader(
    task_ref: str | None, node_config: Mapping[str, Any], app_ref: str = DEFAULT_CLIENTAPP_REF
) -> Callable[[], None]:
    """Import the ClientApp and warm the site's task: data set, model, optimiser.

    The task is ``task_ref``, else the node config's ``task``, else ``digits`` (the
    ClientApp's own default). Node config keys become task options as in the ClientApp.
    """

    def preload() -> None:
        load_installed_app(app_ref)
        from fedcommons.tasks import load_task

        ref = str(task_ref or node_config.get("task") or "digits")
        options = {k.removeprefix("task."): v for k, v in node_config.items() if k != "task"}
        task = load_task(ref, options)
        model = task.build_model()
        task.optimizer(model.parameters(), 0.01)  # first optimiser imports torch._dynamo
        loader = task.train_loader(batch_size=16, seed=0)
        next(iter(loader), None)

    return preload


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    def watch() -> None:
        while not stop.wait(0.5):
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                log.warning("warm.parent-gone", parent_pid=parent_pid)
                stop.set()
            except PermissionError:
                pass

    threading.Thread(target=watch, name="warm-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """``python -m fedcommons.client_sdk.warm``: serve one SuperNode until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="SuperNode HOST:PORT")
    parser.add_argument("--root-certificates", help="CA of a TLS Runtime API (default: none)")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    parser.add_argument("--task", help="task reference to warm up before the first round")
    parser.add_argument("--node-config", default="{}", help="node config as a JSON object")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    parser.add_argument("--max-tasks", type=int, help="exit after this many tasks")
    args = parser.parse_args(argv)
    configure_logging()
    map_large_blocks()  # a model a round comes and goes: give freed ones back at once
    try:
        node_config = json.loads(args.node_config)
        if not isinstance(node_config, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        print(f"error: --node-config is not a JSON object: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def request_stop(_signum: int, _frame: Any) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    if args.parent_pid:
        _watch_parent(args.parent_pid, stop)
    try:
        worker = WarmWorker(
            args.runtime_api_address,
            root_certificates=str(Path(args.root_certificates)) if args.root_certificates else None,
            poll_interval=args.poll_interval,
            preload=task_preloader(args.task, node_config),
        )
    except WarmWorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info("warm.started", runtime_api=args.runtime_api_address, pid=os.getpid())
    served = worker.serve(stop, max_tasks=args.max_tasks)
    log.info("warm.stopped", tasks=served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
