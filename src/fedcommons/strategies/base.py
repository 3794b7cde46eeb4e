"""The aggregator contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedcommons.wire.update import ClientUpdate


class Aggregator(ABC):
    """Streaming aggregation over one round.

    Lifecycle per round: :meth:`begin` with the base weights θ0, :meth:`fold` once per
    accepted update (in arrival order), :meth:`finalize` for the step Δ* the coordinator
    adds to θ0. State must stay O(model size) whatever the number of clients.
    """

    #: Registry name, e.g. ``"fedavg"``.
    name: ClassVar[str]
    #: Paper or reference the rule comes from.
    reference: ClassVar[str] = ""

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

    @abstractmethod
    def finalize(self) -> dict[str, torch.Tensor]:
        """Return the server step Δ* (same names, shapes and dtypes as θ0)."""
