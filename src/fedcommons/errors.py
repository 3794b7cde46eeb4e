"""Typed errors: every bad input gets one of these, with a message naming the problem."""

from __future__ import annotations


class FedcommonsError(Exception):
    """Base class of every error fedcommons raises on purpose."""


class ConfigError(FedcommonsError, ValueError):
    """A run, task or strategy configuration is invalid; raised before any round starts."""


class UnknownTaskError(ConfigError):
    """The task reference names no built-in task and no importable ``module:attr``."""


class UnknownStrategyError(ConfigError):
    """The strategy name is not registered."""


class RegistryError(FedcommonsError):
    """The release registry cannot be used as asked."""


class RegistryNotWritableError(RegistryError):
    """The registry directory cannot be created or written."""


class ReleaseNotFoundError(RegistryError, LookupError):
    """No release matches the requested name and version."""


class UpdateRejectedError(FedcommonsError):
    """A client's reply failed validation; it is counted and left out of the aggregate.

    ``reason`` is a short machine-readable code (used as a metric label).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RoundFailedError(FedcommonsError):
    """A round ended without enough valid replies to produce an aggregate."""


class CompressionSpecError(ConfigError):
    """A compression spec (``topk:0.01+int8``, ``int4``, ...) cannot be parsed or is invalid."""


class EncodingError(FedcommonsError):
    """A client-side update cannot be encoded as asked (e.g. a non-floating tensor)."""


class MalformedUpdateError(UpdateRejectedError):
    """An encoded update failed decoding or validation (see ``reason`` for which check)."""


class ClientStateError(FedcommonsError):
    """The client's state directory (error-feedback residual, FISH mask) cannot be used."""
