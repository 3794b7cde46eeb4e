"""Plain Flower baseline for ``benchmarks.deployment_latency``: quickstart-style apps.

A Message-API ``ServerApp`` running Flower's own ``FedAvg.start`` and a ``ClientApp``
that trains and replies with its full weights and ``num-examples``, as in Flower's
PyTorch quickstart. Same digits MLP, data partition, optimiser and epochs as
fedcommons' built-in ``digits`` task (its data and model helpers are reused so that
both sides do exactly the same arithmetic); nothing else of fedcommons runs. The
benchmark copies this file into a Flower app directory, so the FAB ships it and every
SuperNode runs it the way Flower runs any app.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcommons.tasks.digits import DigitsTask

clientapp = ClientApp()
serverapp = ServerApp()


@clientapp.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally from the received weights; reply with weights and num-examples."""
    cfg = msg.content["config"]
    task = DigitsTask(
        {
            "partition-id": int(context.node_config["partition-id"]),
            "num-partitions": int(context.node_config["num-partitions"]),
            "hidden": str(context.run_config.get("hidden", "64")),
        }
    )
    model = task.build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    loader = task.train_loader(batch_size=int(cfg["batch-size"]), seed=int(cfg["server-round"]))
    optimizer = task.optimizer(model.parameters(), float(cfg["lr"]))
    loss_sum, seen = 0.0, 0
    for _ in range(int(cfg["local-epochs"])):
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
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


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over every node for ``num-server-rounds``; time each round."""
    cfg = context.run_config
    nodes, rounds = int(cfg["nodes"]), int(cfg["num-server-rounds"])
    task = DigitsTask({"hidden": str(cfg["hidden"])})
    validation = task.validation_loader()
    marks: list[float] = []
    accuracy: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = task.build_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = task.evaluate(model, validation)
        accuracy.append(metrics["accuracy"])
        marks.append(time.monotonic())
        return MetricRecord({"accuracy": metrics["accuracy"]})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,  # centralised validation only, as fedcommons does
        min_train_nodes=nodes,
        min_available_nodes=nodes,
    )
    strategy.start(
        grid=grid,
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
        json.dumps({"round_seconds": seconds, "val_accuracy": accuracy[1:]})
    )
