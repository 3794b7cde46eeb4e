"""Malicious institutions for the Byzantine benchmark and tests (never shipped to sites).

Each attacker is a real client: a Flower ``ClientApp`` whose ``train`` handler runs the
honest fedcommons handler (:func:`fedcommons.client_sdk.client_app.train`) and then
rewrites the ``delta`` of its own reply, or a :class:`~fedcommons.tasks.Task` that
poisons its own training data. The update travels through the normal reply path
(Flower message, reply intake, validation, aggregator): nothing in the coordinator or
the aggregation is touched.

- ``sign-flip``: Δ ← −``scale`` · Δ_honest (scale 10).
- ``gaussian``: Δ ← N(0, σ²) per coordinate, no training (σ = ``sigma``).
- ``model-replacement`` (Bagdasaryan et al. 2020, "How To Backdoor Federated Learning",
  AISTATS): the attacker trains its own model X from the global model G on its
  objective (here: every label flipped, y → 9 − y) and submits γ(X − G) with the boost
  γ = n / (η m) (n clients per round, server learning rate η = 1, m colluding
  attackers), so that the mean of the round lands on X.
- ``label-flip``: data poisoning, an honest protocol on flipped labels (y → 9 − y).

Attackers use dense fp32 updates (``compression = "dense"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader, TensorDataset

from fedcommons.client_sdk.client_app import app as honest_app
from fedcommons.client_sdk.client_app import train as honest_train
from fedcommons.tasks.digits import NUM_CLASSES, DigitsTask, digits_split
from fedcommons.wire import keys

ATTACKS = ("sign-flip", "gaussian", "model-replacement", "label-flip")
#: Node-config task of an institution that poisons its labels (the site's own setting).
LABEL_FLIP_TASK = "benchmarks.attacks:LabelFlipDigits"


class LabelFlipDigits(DigitsTask):
    """The ``digits`` task on this institution's partition with every label y → 9 − y."""

    name = "digits"

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        """The honest partition, labels flipped."""
        split = digits_split()
        idx = self.partition_indices()
        flipped = (NUM_CLASSES - 1) - split.y_train[idx]
        dataset = TensorDataset(
            torch.from_numpy(split.x_train[idx]), torch.from_numpy(np.ascontiguousarray(flipped))
        )
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def _rewrite_delta(
    transform: Callable[[dict[str, torch.Tensor], Message], dict[str, torch.Tensor]],
) -> ClientApp:
    """A ClientApp that trains honestly, then replaces its reply's delta."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest_train(msg, context)
        if reply.has_error() or keys.DELTA_ARRAYS not in reply.content:
            return reply
        delta = reply.content[keys.DELTA_ARRAYS].to_torch_state_dict()
        reply.content[keys.DELTA_ARRAYS] = ArrayRecord(transform(delta, msg))
        return reply

    return app


def sign_flip_app(scale: float = 10.0) -> ClientApp:
    """Δ ← −scale · Δ_honest."""
    return _rewrite_delta(lambda d, _m: {k: (-scale * v).to(v.dtype) for k, v in d.items()})


def gaussian_app(sigma: float, seed: int = 0) -> ClientApp:
    """Δ ← N(0, σ²) per coordinate (a fresh draw every round)."""

    def noise(delta: dict[str, torch.Tensor], msg: Message) -> dict[str, torch.Tensor]:
        round_no = int(msg.content[keys.TRAIN_CONFIG][keys.ROUND])
        gen = torch.Generator().manual_seed(seed * 100_003 + round_no)
        return {
            k: (torch.randn(v.shape, generator=gen) * sigma).to(v.dtype) for k, v in delta.items()
        }

    return _rewrite_delta(noise)


def model_replacement_app(boost: float) -> ClientApp:
    """γ(X − G): the update of a model trained on flipped labels, boosted by γ.

    Run it with the node config ``task = LABEL_FLIP_TASK`` so that X is trained on the
    attacker's objective.
    """
    return _rewrite_delta(lambda d, _m: {k: (boost * v).to(v.dtype) for k, v in d.items()})


def attacker(
    attack: str, *, clients: int, attackers: int, sigma: float = 0.5, seed: int = 0
) -> tuple[ClientApp, dict[str, Any]]:
    """The ClientApp and the node-config additions of one attacking institution."""
    if attack == "sign-flip":
        return sign_flip_app(10.0), {}
    if attack == "gaussian":
        return gaussian_app(sigma, seed), {}
    if attack == "model-replacement":
        boost = clients / max(attackers, 1)  # γ = n / (η m), η = 1
        return model_replacement_app(boost), {"task": LABEL_FLIP_TASK}
    if attack == "label-flip":
        return honest_app, {"task": LABEL_FLIP_TASK}
    raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")


def federation(
    attack: str, clients: int, attackers: int, *, sigma: float = 0.5, seed: int = 0
) -> tuple[list[ClientApp], list[Mapping[str, Any]]]:
    """ClientApps and node configs of ``clients`` institutions, the last ``attackers`` bad."""
    apps: list[ClientApp] = []
    configs: list[Mapping[str, Any]] = []
    for i in range(clients):
        if i >= clients - attackers:
            app, cfg = attacker(
                attack, clients=clients, attackers=attackers, sigma=sigma, seed=seed + i
            )
        else:
            app, cfg = honest_app, {}
        apps.append(app)
        configs.append(cfg)
    return apps, configs
