"""Strategies by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedcommons.errors import ConfigError, UnknownStrategyError
from fedcommons.strategies.base import Aggregator
from fedcommons.strategies.fedavg import FedAvg

_BUILTIN: dict[str, Callable[..., Aggregator]] = {FedAvg.name: FedAvg}


def available_strategies() -> list[str]:
    """Registered strategy names."""
    return sorted(_BUILTIN)


def create_strategy(name: str, params: Mapping[str, Any] | None = None) -> Aggregator:
    """Instantiate strategy ``name`` with ``params``; typed errors name what is valid."""
    try:
        factory = _BUILTIN[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; available: {', '.join(available_strategies())}"
        ) from None
    try:
        return factory(**dict(params or {}))
    except TypeError as exc:
        raise ConfigError(f"strategy {name!r}: bad parameters {dict(params or {})}: {exc}") from exc
