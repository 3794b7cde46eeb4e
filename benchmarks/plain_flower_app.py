"""Plain Flower baseline for the deployment benchmarks: quickstart-style apps.

A Message-API ``ServerApp`` running Flower's own ``FedAvg.start`` and a ``ClientApp``
that trains and replies with its full weights and ``num-examples``, as in Flower's
PyTorch quickstart. The model, data partition, optimiser and epochs are those of the
fedcommons task the run config names (``task``, default ``digits``, with its ``task.*``
options; the node config adds ``partition-id`` / ``num-partitions``): its model and data
helpers are reused so that both sides do exactly the same arithmetic, and nothing else of
fedcommons runs. The benchmark copies this file into a Flower app directory, so the FAB
ships it and every SuperNode runs it the way Flower runs any app.

``benchmarks.deployment_latency`` uses the digits MLP; ``benchmarks.large_model`` a
110M-parameter encoder (``benchmarks.large_model_task``). The ServerApp writes per-round
seconds, validation accuracy (NaN when the task has no validation data) and the bytes of
arrays it pushed and pulled to ``timings-path``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcommons.tasks import Task, load_task

clientapp = ClientApp()
serverapp = ServerApp()


@clientapp.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally from the received weights; reply with weights and num-examples."""
    cfg = msg.content["config"]
    task = _task(context.run_config, context.node_config)
    model = task.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    loader = task.train_loader(batch_size=int(cfg["batch-size"]), seed=int(cfg["server-round"]))
    optimizer = task.optimizer(model.parameters(), float(cfg["lr"]))
    loss_sum, seen = 0.0, 0
    for _ in range(int(cfg["local-epochs"])):
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = task.loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(targets)
            seen += len(targets)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {"train_loss": loss_sum / max(seen, 1), "num-examples": len(loader.dataset)}
            ),
        }
    )
    return Message(content=content, reply_to=msg)


def _task(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> Task:
    """The run config's ``task`` with its ``task.*`` options (+ the node's partition)."""
    options = {k[len("task.") :]: v for k, v in run_config.items() if k.startswith("task.")}
    for key in ("partition-id", "num-partitions"):
        if node_config and key in node_config:
            options[key] = int(node_config[key])
    return load_task(str(run_config.get("task", "digits")), options)


class _CountingGrid(Grid):
    """Delegates to Flower's grid; counts the array bytes of every message each way."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.pushed = self.pulled = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    @staticmethod
    def _array_bytes(message: Message) -> int:
        if message.has_error():
            return 0
        return sum(len(a.data) for r in message.content.array_records.values() for a in r.values())

    @property
    def run(self) -> Any:
        return self._grid.run

    def set_run(self, run_id: int) -> None:
        self._grid.set_run(run_id)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        self.pushed += sum(self._array_bytes(m) for m in messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self._grid.pull_messages(message_ids))
        self.pulled += sum(self._array_bytes(m) for m in replies)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        self.pushed += sum(self._array_bytes(m) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.pulled += sum(self._array_bytes(m) for m in replies)
        return replies


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over every node for ``num-server-rounds``; time each round."""
    cfg = context.run_config
    nodes, rounds = int(cfg["nodes"]), int(cfg["num-server-rounds"])
    task = _task(cfg)
    validation = task.validation_loader()
    marks: list[float] = []
    accuracy: list[float] = []
    counting = _CountingGrid(grid)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        score = float("nan")
        if validation is not None:
            model = task.build_model()
            model.load_state_dict(arrays.to_torch_state_dict())
            score = task.evaluate(model, validation)["accuracy"]
        accuracy.append(score)
        marks.append(time.monotonic())
        return MetricRecord({"accuracy": score})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,  # centralised validation only, as fedcommons does
        min_train_nodes=nodes,
        min_available_nodes=nodes,
    )
    strategy.start(
        grid=counting,
        initial_arrays=ArrayRecord(task.build_model().state_dict()),
        num_rounds=rounds,
        train_config=ConfigRecord(
            {
                "lr": float(cfg["lr"]),
                "local-epochs": int(cfg["local-epochs"]),
                "batch-size": int(cfg["batch-size"]),
            }
        ),
        evaluate_fn=evaluate,
    )
    seconds = [b - a for a, b in itertools.pairwise(marks)]
    Path(str(cfg["timings-path"])).write_text(
        json.dumps(
            {
                "round_seconds": seconds,
                "val_accuracy": accuracy[1:],
                "pushed_array_bytes": counting.pushed,
                "pulled_array_bytes": counting.pulled,
            }
        )
    )
