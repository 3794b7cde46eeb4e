"""The decorator path: a strategy written as one typed function.

.. code-block:: python

    from fedcommons.strategies import strategy

    @strategy("geomed", reference="Pillutla et al. 2022, Robust Aggregation for FL")
    def geometric_median(updates, base, *, iterations: int = 10) -> dict[str, torch.Tensor]:
        ...

The function receives every update of the round (a list of
:class:`~fedcommons.wire.update.ClientUpdate`) and the base weights θ0, plus its
keyword-only parameters, and returns Δ*. Every keyword-only parameter needs a type hint
and a default: they become the strategy's parameters (checked, listed by
``fedcommons strategies list``). The rule sees all updates at once, so it buffers them:
memory is O(K × model) — write an :class:`~fedcommons.strategies.base.Aggregator`
subclass for a streaming rule.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from fedcommons.strategies.robust import BufferedAggregator
from fedcommons.wire.update import ClientUpdate

F = TypeVar("F", bound=Callable[..., Any])

StrategyFunction = Callable[..., Mapping[str, torch.Tensor]]


def strategy(
    name: str,
    *,
    reference: str = "",
    description: str = "",
    permutation_invariant: bool = True,
    single_update_identity: bool = True,
    needs_fisher: bool = False,
    uses_mask: bool = False,
    check: Callable[..., None] | None = None,
) -> Callable[[F], F]:
    """Turn ``fn(updates, base, *, param: T = default, ...) -> dict`` into a strategy.

    ``check(**params)`` validates parameter values when the strategy is created, i.e.
    before round 1 of a run (raise :class:`~fedcommons.errors.ConfigError` with a message
    naming the fix); without it a bad value surfaces only when ``fn`` first runs, after
    round 1 trained.

    Returns the function unchanged with an ``aggregator`` attribute: the generated
    :class:`Aggregator` subclass, which the registry, the entry-point loader and the
    conformance kit accept in place of the function. Raises ``TypeError`` at decoration
    time when a parameter lacks a type hint or a default.
    """

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)
        params = list(sig.parameters.values())
        positional = [
            p
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        if len(positional) != 2:
            raise TypeError(
                f"@strategy function {fn.__qualname__} must take (updates, base, *, params...)"
            )
        for p in params[2:]:
            if p.kind is not p.KEYWORD_ONLY:
                raise TypeError(f"{fn.__qualname__}: parameter {p.name!r} must be keyword-only")
            if p.annotation is p.empty or p.default is p.empty:
                raise TypeError(
                    f"{fn.__qualname__}: parameter {p.name!r} needs a type hint and a default"
                )
        doc = (fn.__doc__ or "").strip().splitlines()

        def __init__(self: BufferedAggregator, **kwargs: Any) -> None:
            BufferedAggregator.__init__(self)
            unknown = sorted(set(kwargs) - {p.name for p in params[2:]})
            if unknown:
                raise TypeError(f"unknown parameters {unknown}")
            defaults = {p.name: p.default for p in params[2:]}
            self._kwargs = {**defaults, **kwargs}  # type: ignore[attr-defined]
            if check is not None:
                check(**self._kwargs)  # type: ignore[attr-defined]

        def params_(self: BufferedAggregator) -> dict[str, Any]:
            return dict(self._kwargs)  # type: ignore[attr-defined]

        def combine(
            self: BufferedAggregator,
            updates: Sequence[ClientUpdate],
            base: Mapping[str, torch.Tensor],
        ) -> dict[str, torch.Tensor]:
            return dict(fn(list(updates), dict(base), **self._kwargs))  # type: ignore[attr-defined]

        cls = type(
            f"{fn.__name__}_aggregator",
            (BufferedAggregator,),
            {
                "__init__": __init__,
                "params": params_,
                "combine": combine,
                "name": name,
                "reference": reference,
                "description": description or (doc[0] if doc else ""),
                "permutation_invariant": permutation_invariant,
                "single_update_identity": single_update_identity,
                "needs_fisher": needs_fisher,
                "uses_mask": uses_mask,
                "_strategy_function": staticmethod(fn),
                "__module__": fn.__module__,
                "__doc__": fn.__doc__,
            },
        )
        fn.aggregator = cls  # type: ignore[attr-defined]
        return fn

    return wrap
