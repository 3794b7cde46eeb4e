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


class CertificateError(FedcommonsError):
    """A certificate, key or allowlist entry is missing, malformed or of the wrong type."""


class AuditLogError(FedcommonsError):
    """The audit log cannot be written or is not a valid JSON-lines log."""
