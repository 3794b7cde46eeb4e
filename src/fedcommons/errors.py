"""Typed errors: every bad input gets one of these, with a message naming the problem."""

from __future__ import annotations


class FedcommonsError(Exception):
    """Base class of every error fedcommons raises on purpose."""


class ConfigError(FedcommonsError, ValueError):
    """A run, task or strategy configuration is invalid; raised before any round starts."""


class InvalidNameError(ConfigError):
    """A name that becomes a path (line, version, alias, run or task name) is unsafe."""


class UnknownTaskError(ConfigError):
    """The task reference names no built-in task and no importable ``module:attr``."""


class TaskRefusedError(FedcommonsError):
    """A round asked an institution for a task its own configuration does not allow."""


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


class SigningKeyError(RegistryError):
    """A signing or public key cannot be read, is not Ed25519, or does not match."""


class VerificationError(RegistryError):
    """A release failed verification; ``path`` names the file that is wrong."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class SignatureError(VerificationError):
    """A manifest signature is missing, malformed, by another key, or does not match."""


class RollbackError(VerificationError):
    """``HEAD.json`` is older than, or forks from, the last head this user accepted."""


class TrustError(RegistryError):
    """The signer to trust cannot be determined: no pin, a bad pin, or a pin mismatch."""


class PatchError(RegistryError):
    """A release patch is malformed or cannot be applied."""


class PatchBaseMismatchError(PatchError):
    """A patch was applied to weights other than the base it was made from."""


class VersionOverrideError(ConfigError):
    """An operator's version override is invalid (unknown bump, no reason, or too low)."""


class CandidateRejectedError(FedcommonsError):
    """The validation gate rejected the candidate; it was recorded, nothing was published."""

    def __init__(self, message: str, rejection_id: int, reasons: list[str]) -> None:
        super().__init__(message)
        self.rejection_id = rejection_id
        self.reasons = reasons


class PrivacyConfigError(ConfigError):
    """A differential-privacy budget or mechanism parameter is out of range."""


class PrivacyBudgetExceededError(FedcommonsError):
    """Running the next round would take a release line or an institution past its budget."""


class PrivacyAuditError(FedcommonsError):
    """A privacy audit failed: a claim could not be reproduced from the evidence."""


class LedgerTamperedError(PrivacyAuditError):
    """A privacy ledger's hash chain is broken; ``round`` names the first bad entry."""

    def __init__(self, message: str, *, round_no: int | None = None, seq: int | None = None):
        super().__init__(message)
        self.round = round_no
        self.seq = seq


class DuplicateStrategyError(ConfigError):
    """Two strategies (built-in or plugged in) claim the same registry name."""


class StrategyParameterError(ConfigError):
    """A strategy was given an unknown parameter or a value of the wrong type."""


class StrategyError(RoundFailedError):
    """An aggregator raised or returned a malformed step; the round fails, nothing is published.

    ``strategy`` names the strategy and ``origin`` where it comes from (``built-in`` or the
    plugin's distribution).
    """

    def __init__(self, strategy: str, origin: str, detail: str) -> None:
        super().__init__(f"strategy {strategy!r} ({origin}) failed: {detail}")
        self.strategy = strategy
        self.origin = origin
        self.detail = detail


class MergeError(FedcommonsError):
    """An offline merge cannot run as asked (inputs that do not fit together, bad paths)."""


class CompressionSpecError(ConfigError):
    """A compression spec (``topk:0.01+int8``, ``int4``, ...) cannot be parsed or is invalid."""


class EncodingError(FedcommonsError):
    """A client-side update cannot be encoded as asked (e.g. a non-floating tensor)."""


class MalformedUpdateError(UpdateRejectedError):
    """An encoded update failed decoding or validation (see ``reason`` for which check)."""


class ClientStateError(FedcommonsError):
    """The client's state directory (error-feedback residual, FISH mask) cannot be used."""


class CertificateError(FedcommonsError):
    """A certificate, key or allowlist entry is missing, malformed or of the wrong type."""


class AuditLogError(FedcommonsError):
    """The audit log cannot be written or is not a valid JSON-lines log."""


class CheckpointError(RegistryError):
    """A round checkpoint is missing or does not match the hash its commit recorded."""


class RunStateError(FedcommonsError):
    """A durable run cannot do what was asked in its state.

    It finished, was cancelled, does not exist, or was started again with another
    configuration.
    """


class RunCancelledError(RunStateError):
    """The operator cancelled the run; it stopped after its last committed round."""


class FaultSpecError(ConfigError):
    """``FEDCOMMONS_FAULT`` does not name a known fault point, round and action."""


class SecAggProtocolError(FedcommonsError):
    """A secure-aggregation message is malformed, out of order or fails authentication.

    Also raised for requests the protocol forbids (e.g. both secrets of one client).
    """


class SecAggAbortedError(RoundFailedError):
    """A secure-aggregation round cannot unmask its sum; it is aborted, nothing is published.

    Raised when fewer participants than the threshold remain, or a secret fails to
    reconstruct.
    """


class SecAggRosterError(ConfigError):
    """An institution's SecAgg+ roster or signing key is missing, malformed or unauthentic."""


class SecAggIncompatibleError(ConfigError):
    """Secure aggregation was combined with something that needs individual updates."""
