"""Aggregation strategies: plain tensors in, tensors out. Never imports Flower.

An :class:`Aggregator` folds client updates one at a time into a state of size O(model)
and returns the server step Δ* at :meth:`Aggregator.finalize`; the same classes serve
federated rounds and offline merges of released models. Built-ins: ``fedavg`` (FedAvgM
via ``server_momentum``), ``fedadam``, ``fisher``, ``mask-aligned`` (TIES sign election),
``lora-exact`` (LoRA pairs merged as products), ``median``, ``trimmed-mean``,
``multi-krum``; every one takes ``clip_norm`` (norm bounding). Plugins register under the
entry-point group ``fedcommons.strategies``; authors test them with
:mod:`fedcommons.strategies.testing`.
"""

from fedcommons.strategies.base import (
    Aggregator,
    check_step,
    clip_update,
    guarded_begin,
    guarded_finalize,
    guarded_fold,
    guarded_fold_many,
)
from fedcommons.strategies.fedavg import FedAdam, FedAvg
from fedcommons.strategies.fisher import FisherMerge
from fedcommons.strategies.lora import LoraExact, lora_pairs
from fedcommons.strategies.mask_aligned import MaskAligned
from fedcommons.strategies.plugin import strategy
from fedcommons.strategies.registry import (
    ENTRY_POINT_GROUP,
    StrategySpec,
    available_strategies,
    create_strategy,
    get_spec,
    refresh_plugins,
    register_strategy,
    strategy_code,
    strategy_specs,
    unregister_strategy,
)
from fedcommons.strategies.robust import BufferedAggregator, Median, MultiKrum, TrimmedMean

__all__ = [
    "ENTRY_POINT_GROUP",
    "Aggregator",
    "BufferedAggregator",
    "FedAdam",
    "FedAvg",
    "FisherMerge",
    "LoraExact",
    "MaskAligned",
    "Median",
    "MultiKrum",
    "StrategySpec",
    "TrimmedMean",
    "available_strategies",
    "check_step",
    "clip_update",
    "create_strategy",
    "get_spec",
    "guarded_begin",
    "guarded_finalize",
    "guarded_fold",
    "guarded_fold_many",
    "lora_pairs",
    "refresh_plugins",
    "register_strategy",
    "strategy",
    "strategy_code",
    "strategy_specs",
    "unregister_strategy",
]
