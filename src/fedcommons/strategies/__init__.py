"""Aggregation strategies: plain tensors in, tensors out. Never imports Flower.

An :class:`Aggregator` folds client updates one at a time into a state of size O(model)
and returns the server step Δ* at :meth:`Aggregator.finalize`; the same classes serve
federated rounds and offline merges of released models.
"""

from fedcommons.strategies.base import Aggregator
from fedcommons.strategies.fedavg import FedAvg
from fedcommons.strategies.registry import available_strategies, create_strategy

__all__ = ["Aggregator", "FedAvg", "available_strategies", "create_strategy"]
