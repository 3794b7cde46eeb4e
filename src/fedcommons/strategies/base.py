"""The aggregator contract, and the guards the coordinator runs every aggregator under."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from fedcommons.errors import ConfigError, FedcommonsError, StrategyError
from fedcommons.wire.update import ClientUpdate, all_finite, squared_norm


class Aggregator(ABC):
    """Streaming aggregation over one round.

    Lifecycle per round: :meth:`begin` with the base weights θ0, :meth:`fold` once per
    accepted update (in arrival order), :meth:`finalize` for the step Δ* the coordinator
    adds to θ0. State must stay O(model size) whatever the number of clients, unless the
    class declares ``streaming = False`` (robust rules that need every update).

    Constructor keyword arguments are the strategy's parameters: the registry reads their
    names, type hints and defaults, checks what an operator passes, and lists them in
    ``fedcommons strategies list``. State that must survive rounds (server momentum, Adam
    moments) lives on the instance; :meth:`begin` resets only the round's state.
    """

    #: Registry name, e.g. ``"fedavg"``.
    name: ClassVar[str]
    #: Paper or reference the rule comes from.
    reference: ClassVar[str] = ""
    #: One line on what the rule does (shown by ``strategies list``).
    description: ClassVar[str] = ""
    #: Clients must send their diagonal Fisher (the coordinator asks for it and rejects
    #: replies without one).
    needs_fisher: ClassVar[bool] = False
    #: The rule reads ``ClientUpdate.mask`` (sparse updates are aligned, not averaged
    #: with zeros).
    uses_mask: ClassVar[bool] = False
    #: State is O(model) whatever the number of clients.
    streaming: ClassVar[bool] = True
    #: The result does not depend on the order updates arrive in (checked by the kit).
    permutation_invariant: ClassVar[bool] = True
    #: With one update, Δ* equals that update's delta (false for server optimisers).
    single_update_identity: bool = True
    #: State survives :meth:`begin` (server momentum, Adam moments): a round's result
    #: depends on earlier rounds. Instances may set this (and the flag above) per config.
    cross_round_state: bool = False

    #: Where the strategy comes from; the registry sets it on instances it creates.
    origin: str = "built-in"

    def __init__(self) -> None:
        self.num_folded = 0

    def params(self) -> dict[str, Any]:
        """The strategy's parameters, as recorded in release manifests."""
        return {}

    @abstractmethod
    def begin(self, base: Mapping[str, torch.Tensor]) -> None:
        """Start a round from base weights θ0 (resets the state)."""

    @abstractmethod
    def fold(self, update: ClientUpdate) -> None:
        """Fold one validated update into the state."""

    def fold_many(self, updates: Sequence[ClientUpdate]) -> None:
        """Fold several updates, in order: the same state as ``fold`` on each in turn.

        The coordinator passes the replies that arrived together; an aggregator may fold
        them in one pass over its state (FedAvg does). The default folds one by one.
        """
        for update in updates:
            self.fold(update)

    @abstractmethod
    def finalize(self) -> dict[str, torch.Tensor]:
        """Return the server step Δ* (same names, shapes and dtypes as θ0)."""

    def aggregate(
        self, base: Mapping[str, torch.Tensor], updates: Iterable[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """Convenience for offline use: ``begin``, ``fold`` every update, ``finalize``."""
        self.begin(base)
        for update in updates:
            self.fold(update)
        return self.finalize()


def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm of a delta (or a diagonal Fisher) over all tensors."""
    return math.sqrt(squared_norm(delta.values()))


def clip_update(update: ClientUpdate, clip_norm: float | None) -> ClientUpdate:
    """Norm bounding: return ``update`` with Δ scaled to L2 norm ≤ ``clip_norm``.

    Returns the same object when no clipping is needed (or ``clip_norm`` is None), a
    shallow copy with a scaled delta otherwise (the caller's tensors are not modified).
    """
    if clip_norm is None:
        return update
    norm = update_norm(update.delta)
    if norm <= clip_norm:
        return update
    scale = clip_norm / norm
    return ClientUpdate(
        delta={k: v * scale for k, v in update.delta.items()},
        num_examples=update.num_examples,
        node_id=update.node_id,
        metrics=update.metrics,
        mask=update.mask,
        fisher=update.fisher,
        weight=update.weight,
    )


def check_clip_norm(name: str, clip_norm: float | None) -> float | None:
    """Validate a ``clip_norm`` parameter (None or > 0)."""
    if clip_norm is None:
        return None
    if not (isinstance(clip_norm, int | float) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"{name} clip_norm must be a finite number > 0, got {clip_norm!r}")
    return float(clip_norm)


def check_server_lr(name: str, server_lr: float) -> float:
    """Validate a ``server_lr`` parameter (a finite number > 0)."""
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ConfigError(f"{name} server_lr must be > 0, got {server_lr}")
    return float(server_lr)


def check_step(
    step: object, base: Mapping[str, torch.Tensor], strategy: str, origin: str
) -> dict[str, torch.Tensor]:
    """Check a finalize() result: same names, shapes and dtypes as θ0, all finite.

    Raises :class:`StrategyError` naming the strategy and what is wrong.
    """
    if not isinstance(step, Mapping):
        raise StrategyError(
            strategy, origin, f"finalize returned {type(step).__name__}, not a dict"
        )
    missing = sorted(set(base) - set(step))
    extra = sorted(set(step) - set(base))
    if missing or extra:
        raise StrategyError(
            strategy, origin, f"step tensors: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    out: dict[str, torch.Tensor] = {}
    for name, ref in base.items():
        value = step[name]
        if not isinstance(value, torch.Tensor):
            raise StrategyError(strategy, origin, f"step {name} is {type(value).__name__}")
        if tuple(value.shape) != tuple(ref.shape):
            raise StrategyError(
                strategy,
                origin,
                f"step {name} has shape {tuple(value.shape)}, base has {tuple(ref.shape)}",
            )
        if value.dtype != ref.dtype:
            raise StrategyError(
                strategy, origin, f"step {name} has dtype {value.dtype}, base has {ref.dtype}"
            )
        if not all_finite(value):
            raise StrategyError(strategy, origin, f"step {name} contains NaN or Inf")
        out[name] = value
    return out


def guarded_begin(aggregator: Aggregator, base: Mapping[str, torch.Tensor]) -> None:
    """``aggregator.begin(base)``; any unexpected exception becomes a StrategyError."""
    _guarded(aggregator, "begin", aggregator.begin, base)


def _crc(value: torch.Tensor) -> int:
    import zlib

    flat = value.detach().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(memoryview(flat.numpy()))


def _input_tensors(update: ClientUpdate) -> list[tuple[str, torch.Tensor, int]]:
    """(label, tensor, CRC-32) of every CPU tensor the update arrived with."""
    out = []
    for what in ("delta", "mask", "fisher"):
        for name, value in (getattr(update, what, None) or {}).items():
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                out.append((f"{what}[{name!r}]", value, _crc(value)))
    return out


def guarded_fold(aggregator: Aggregator, update: ClientUpdate) -> None:
    """``aggregator.fold(update)``; any unexpected exception becomes a StrategyError.

    Updates are read-only views of the reply bytes, which torch cannot mark read-only:
    for a strategy that is not built in, the update's tensors are checksummed before and
    after ``fold``, and a write into them fails the round (nothing is published) instead
    of silently aggregating clipped or corrupted updates.
    """
    _checked_fold(aggregator, aggregator.fold, update, [update])


def guarded_fold_many(aggregator: Aggregator, updates: Sequence[ClientUpdate]) -> None:
    """``aggregator.fold_many(updates)``, guarded as :func:`guarded_fold` guards ``fold``."""
    _checked_fold(aggregator, aggregator.fold_many, updates, updates)


def _checked_fold(
    aggregator: Aggregator, call: Callable[..., Any], arg: Any, updates: Sequence[ClientUpdate]
) -> None:
    if aggregator.origin == "built-in":  # the built-ins pass the kit's untouched check
        _guarded(aggregator, "fold", call, arg)
        return
    # the objects themselves: a plugin may rebind fields
    inputs = [item for update in updates for item in _input_tensors(update)]
    _guarded(aggregator, "fold", call, arg)
    written = [label for label, value, crc in inputs if _crc(value) != crc]
    if written:
        raise StrategyError(
            _name(aggregator),
            aggregator.origin,
            f"fold wrote into the update's {', '.join(written)} in place; updates are "
            "read-only views of the reply bytes: copy before changing them "
            "(e.g. update.delta[k].clone().clamp_(...))",
        )


def guarded_finalize(
    aggregator: Aggregator, base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``aggregator.finalize()`` checked by :func:`check_step`; failures are StrategyErrors."""
    step = _guarded(aggregator, "finalize", aggregator.finalize)
    return check_step(step, base, _name(aggregator), aggregator.origin)


def _guarded(aggregator: Aggregator, what: str, call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)``; a non-fedcommons exception becomes a StrategyError naming ``what``."""
    try:
        return call(*args)
    except FedcommonsError:
        raise
    except Exception as exc:
        raise StrategyError(
            _name(aggregator), aggregator.origin, f"{what} raised {type(exc).__name__}: {exc}"
        ) from exc


def _name(aggregator: Aggregator) -> str:
    return getattr(aggregator, "name", type(aggregator).__name__)
