"""Federated averaging over deltas, streamed, with optional server optimisers.

- ``fedavg`` (McMahan et al. 2017): Δ* = ηs · Σ nᵢ Δᵢ / Σ nᵢ; with ``server_momentum``
  β > 0 it is FedAvgM (Hsu et al. 2019): m ← β m + Δ̄, Δ* = ηs m.
- ``fedadam`` (Reddi et al. 2021): Adam on the pseudo-gradient Δ̄ with server-side
  moments that persist across rounds.

Zeros from compression count as votes (FedAvg ignores masks); use ``mask-aligned`` to
average sparse updates inside their masks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedcommons.errors import ConfigError, RoundFailedError
from fedcommons.strategies.base import Aggregator, check_clip_norm, check_server_lr, clip_update
from fedcommons.wire import kernels
from fedcommons.wire.decoded import LazyDelta
from fedcommons.wire.update import ClientUpdate

SCRATCH_ELEMENTS = 1 << 18  # 2 MiB of float64


def add_scaled(acc: torch.Tensor, value: torch.Tensor, alpha: float, owner: Any) -> None:
    """``acc += alpha * value`` with ``value`` cast to ``acc``'s dtype on the fly.

    A float64 CPU accumulator and a contiguous float32/float64 ``value`` take one
    compiled pass (:func:`fedcommons.wire.kernels.fold_values`: read the value, widen,
    multiply, add; no temporary). Other cases go through ``owner._scratch``, a reusable
    float64 buffer, chunk by chunk, so the cast never allocates a model-sized copy.
    Both give the same bits: ``alpha · float64(v)`` rounded, then added.
    """
    value = value.to(device=acc.device)
    if value.dtype == acc.dtype and acc.dtype != torch.float64:
        acc.add_(value, alpha=alpha)
        return
    if acc.device.type != "cpu" or acc.dtype != torch.float64:
        acc.add_(value.to(acc.dtype), alpha=alpha)
        return
    flat_val = value.reshape(-1)
    if flat_val.dtype in (torch.float32, torch.float64) and flat_val.is_contiguous():
        kernels.fold_values(flat_val.numpy(), float(alpha), acc.view(-1).numpy())
        return
    if owner._scratch.numel() < min(SCRATCH_ELEMENTS, acc.numel()):
        owner._scratch = torch.empty(min(SCRATCH_ELEMENTS, acc.numel()), dtype=torch.float64)
    flat_acc = acc.view(-1)
    for start in range(0, flat_acc.numel(), SCRATCH_ELEMENTS):
        stop = min(start + SCRATCH_ELEMENTS, flat_acc.numel())
        buf = owner._scratch[: stop - start]
        buf.copy_(flat_val[start:stop])
        flat_acc[start:stop].add_(buf, alpha=alpha)


FOLD_BLOCK = 1 << 15  # 256 KiB of float64: one block of the sum stays in L2 per batch


def _range_folder(
    delta: Mapping[str, torch.Tensor], name: str, weight: float
) -> Callable[[int, int, np.ndarray], None]:
    """``f(start, stop, acc)``: ``acc += weight · delta[name].flat[start:stop]``."""
    if isinstance(delta, LazyDelta) and delta.foldable(name):
        return lambda start, stop, acc: delta.fold_range(name, start, stop, weight, acc)
    value = delta[name].detach().reshape(-1)
    if value.device.type != "cpu" or value.dtype not in (torch.float32, torch.float64):
        value = value.to("cpu", torch.float64)
    array = value.contiguous().numpy()
    return lambda start, stop, acc: kernels.fold_values(array[start:stop], weight, acc)


class FedAvg(Aggregator):
    """Δ* = ηs · Σ nᵢ Δᵢ / Σ nᵢ, folded one update at a time.

    The running sum is kept in float64, so the result does not depend on the order in
    which replies arrive (to the float32 precision of the output) and memory is one
    float64 copy of the model, whatever the number of clients, allocated once and zeroed
    at each round's ``begin``. Each update is widened to float64 and added in one
    compiled pass (no model-sized temporary); an encoded int8/int4/fp16 update is
    decoded inside that pass.
    ``accumulate="float32"`` sums in float32 instead (half the memory, about 3× faster;
    the result then depends on arrival order in the last float32 bits). ``server_momentum`` > 0
    adds one float32 momentum buffer that persists across rounds (FedAvgM);
    ``clip_norm`` bounds every update's L2 norm before it is folded.
    """

    name = "fedavg"
    reference = "McMahan et al. 2017, Communication-Efficient Learning of Deep Networks"
    description = "weighted mean of deltas (zeros count); FedAvgM with server_momentum > 0"

    def __init__(
        self,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        clip_norm: float | None = None,
        accumulate: str = "float64",
    ) -> None:
        super().__init__()
        if accumulate not in ("float64", "float32"):
            raise ConfigError(
                f"{self.name} accumulate must be 'float64' or 'float32', got {accumulate!r}"
            )
        self.accumulate = accumulate
        self._acc_dtype = torch.float64 if accumulate == "float64" else torch.float32
        self._scratch = torch.empty(0, dtype=torch.float64)
        self.server_lr = check_server_lr(self.name, server_lr)
        if not 0.0 <= server_momentum < 1.0:
            raise ConfigError(
                f"{self.name} server_momentum must be in [0, 1), got {server_momentum}"
            )
        self.server_momentum = float(server_momentum)
        self.cross_round_state = self.server_momentum > 0
        self.clip_norm = check_clip_norm(self.name, clip_norm)
        self._sum: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._weight = 0.0
        self._momentum: dict[str, torch.Tensor] = {}

    def params(self) -> dict[str, Any]:
        """Return the server learning rate, momentum and clip norm."""
        return {
            "server_lr": self.server_lr,
            "server_momentum": self.server_momentum,
            "clip_norm": self.clip_norm,
            "accumulate": self.accumulate,
        }

    def begin(self, base: Mapping[str, torch.Tensor]) -> None:
        """Zero the accumulators (float64 by default) shaped like θ0.

        The accumulators outlive the round: a coordinator aggregates round after round
        with the same instance, and zeroing memory it already holds is several times
        cheaper than allocating (and page-faulting) a fresh model-sized sum each round.
        They are reallocated only when the architecture, device or dtype changes.
        """
        if not self._reusable(base):
            self._sum = {
                k: torch.zeros(v.shape, dtype=self._acc_dtype, device=v.device)
                for k, v in base.items()
            }
        else:
            for acc in self._sum.values():
                acc.zero_()
        self._dtypes = {k: v.dtype for k, v in base.items()}
        self._weight = 0.0
        self.num_folded = 0
        shapes = {k: tuple(v.shape) for k, v in base.items()}
        if {k: tuple(v.shape) for k, v in self._momentum.items()} != shapes:
            self._momentum = {}  # new architecture: server optimiser state starts over

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The server optimiser's cross-round tensors (empty without momentum).

        The round's sum is not state: ``begin`` zeroes it, so a checkpoint leaves it out.
        """
        tensors = {f"momentum/{k}": v for k, v in self._momentum.items()}
        tensors.update({f"second_moment/{k}": v for k, v in getattr(self, "_v", {}).items()})
        return tensors, {}

    def load_checkpoint_state(self, tensors: Mapping[str, torch.Tensor], meta: Any) -> None:
        """Restore what :meth:`checkpoint_state` saved."""
        del meta
        groups: dict[str, dict[str, torch.Tensor]] = {"momentum": {}, "second_moment": {}}
        for name, tensor in tensors.items():
            group, _, key = name.partition("/")
            groups[group][key] = tensor.clone()
        self._momentum = groups["momentum"]
        if isinstance(self, FedAdam):
            self._v = groups["second_moment"]

    def _reusable(self, base: Mapping[str, torch.Tensor]) -> bool:
        if self._sum.keys() != base.keys():
            return False
        return all(
            acc.shape == v.shape and acc.device == v.device and acc.dtype == self._acc_dtype
            for (acc, v) in ((self._sum[k], base[k]) for k in base)
        )

    def fold(self, update: ClientUpdate) -> None:
        """Add nᵢ Δᵢ to the running sum (see :meth:`fold_many`)."""
        self._fold_batch([update])

    def fold_many(self, updates: Sequence[ClientUpdate]) -> None:
        """Add nᵢ Δᵢ of every update, in order, in one pass over the float64 sum.

        The sum is walked in blocks of 32 Ki values that stay in cache while every
        update's block is added to them, so the sum is read and written once per batch
        instead of once per update (the sum, 8 bytes a value, is most of the memory
        traffic). Each value still gets ``acc ← acc + nᵢ·Δᵢ`` in the updates' order:
        the same bits as folding them one at a time. An encoded update (a
        :class:`~fedcommons.wire.decoded.LazyDelta` not yet decoded) is decoded inside
        the pass, from its int8/int4/fp16 codes, with no dense temporary. A subclass
        that overrides :meth:`fold` gets its ``fold`` called once per update.
        """
        if type(self).fold is not FedAvg.fold:
            for update in updates:
                self.fold(update)
        else:
            self._fold_batch(updates)

    def _fold_batch(self, updates: Sequence[ClientUpdate]) -> None:
        updates = [clip_update(u, self.clip_norm) for u in updates]
        if not self._fused_ok():
            for update in updates:
                for name, acc in self._sum.items():
                    add_scaled(acc, update.delta[name], update.agg_weight, self)
        else:
            for name, acc in self._sum.items():
                flat = acc.view(-1).numpy()
                folders = [_range_folder(u.delta, name, u.agg_weight) for u in updates]
                for start in range(0, flat.size, FOLD_BLOCK):
                    block = flat[start : start + FOLD_BLOCK]
                    for fold_range in folders:
                        fold_range(start, start + block.size, block)
        for update in updates:
            self._weight += update.agg_weight
            self.num_folded += 1

    def _fused_ok(self) -> bool:
        return self._acc_dtype == torch.float64 and all(
            acc.device.type == "cpu" and acc.is_contiguous() for acc in self._sum.values()
        )

    def _mean(self, name: str) -> torch.Tensor:
        """The weighted mean of tensor ``name``, computed in place in its accumulator.

        Consumes the round's sum (finalize ends the round; ``begin`` zeroes it again).
        """
        return self._sum[name].div_(self._weight)

    def _check_folded(self) -> None:
        if self._weight <= 0:
            raise RoundFailedError(f"{self.name}: no update was folded in this round")

    def finalize(self) -> dict[str, torch.Tensor]:
        """Return ηs times the weighted mean delta (through server momentum if set)."""
        self._check_folded()
        out: dict[str, torch.Tensor] = {}
        if self.server_momentum > 0 and not self._momentum:
            self._momentum = {
                k: torch.zeros(v.shape, dtype=torch.float32) for k, v in self._sum.items()
            }
        for k in list(self._sum):
            mean = self._mean(k)
            if self.server_momentum > 0:
                m = self._momentum[k]
                m.mul_(self.server_momentum).add_(mean.to(torch.float32))
                out[k] = (m * self.server_lr).to(self._dtypes[k])
            else:
                out[k] = mean.mul_(self.server_lr).to(self._dtypes[k])
                if out[k].data_ptr() == mean.data_ptr():  # handed over: no longer ours
                    self._sum[k] = torch.empty(0, dtype=self._acc_dtype)
        self._weight = 0.0
        return out


class FedAdam(FedAvg):
    """Adam on the server (Reddi et al. 2021): m ← β₁m + (1−β₁)Δ̄, v ← β₂v + (1−β₂)Δ̄².

    Δ* = ηs · m / (√v + τ). Moments persist across rounds (two float32 copies of the
    model) and restart when the architecture changes.
    """

    name = "fedadam"
    reference = "Reddi et al. 2021, Adaptive Federated Optimization (ICLR)"
    description = "server-side Adam on the mean delta (FedAdam)"
    single_update_identity = False
    cross_round_state = True

    def __init__(
        self,
        server_lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        clip_norm: float | None = None,
        accumulate: str = "float64",
    ) -> None:
        super().__init__(server_lr=server_lr, clip_norm=clip_norm, accumulate=accumulate)
        if not 0.0 <= beta1 < 1.0 or not 0.0 <= beta2 < 1.0:
            raise ConfigError(f"fedadam betas must be in [0, 1), got {beta1}, {beta2}")
        if not tau > 0:
            raise ConfigError(f"fedadam tau must be > 0, got {tau}")
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self.cross_round_state = True
        self._v: dict[str, torch.Tensor] = {}

    def params(self) -> dict[str, Any]:
        """Return ηs, β₁, β₂, τ and the clip norm."""
        return {
            "server_lr": self.server_lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "clip_norm": self.clip_norm,
            "accumulate": self.accumulate,
        }

    def begin(self, base: Mapping[str, torch.Tensor]) -> None:
        """Reset the round's sum; keep the moments unless the architecture changed."""
        super().begin(base)
        if not self._momentum:
            self._v = {}

    def finalize(self) -> dict[str, torch.Tensor]:
        """Update the moments with the mean delta and return the Adam step."""
        self._check_folded()
        if not self._momentum:
            self._momentum = {
                k: torch.zeros(v.shape, dtype=torch.float32) for k, v in self._sum.items()
            }
            self._v = {
                k: torch.full(v.shape, self.tau**2, dtype=torch.float32)
                for k, v in self._sum.items()
            }
        out: dict[str, torch.Tensor] = {}
        for k in list(self._sum):
            g32 = self._mean(k).to(torch.float32)
            m, v = self._momentum[k], self._v[k]
            m.mul_(self.beta1).add_(g32, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g32, g32, value=1 - self.beta2)
            out[k] = (self.server_lr * m / (v.sqrt() + self.tau)).to(self._dtypes[k])
        self._weight = 0.0
        return out
