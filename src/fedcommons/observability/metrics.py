"""Prometheus metrics of the coordinator (prometheus-client, Prometheus naming).

The ServerApp process serves them over HTTP (``/metrics``) when a port is configured:
``FEDCOMMONS_METRICS_PORT`` (0 or unset: off) and ``FEDCOMMONS_METRICS_HOST`` (default
``127.0.0.1``; bind elsewhere only on a network you trust). ``fedcommons coordinator
start`` sets both from its settings for the ServerApp processes it launches.

Metrics live in their own :class:`~prometheus_client.CollectorRegistry` so that tests and
embedding applications can read them without the process-wide default registry.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from fedcommons.errors import ConfigError
from fedcommons.logs import get_logger

log = get_logger("fedcommons.metrics")

ENV_PORT = "FEDCOMMONS_METRICS_PORT"
ENV_HOST = "FEDCOMMONS_METRICS_HOST"
DEFAULT_HOST = "127.0.0.1"

REGISTRY = CollectorRegistry(auto_describe=True)

ROUNDS = Counter(
    "fedcommons_rounds",
    "Rounds finished, by outcome (completed or failed).",
    ["outcome"],
    registry=REGISTRY,
)
ROUND_DURATION = Histogram(
    "fedcommons_round_duration_seconds",
    "Wall time of a round: push, collect, aggregate, score.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    registry=REGISTRY,
)
UPDATES_RECEIVED = Counter(
    "fedcommons_updates_received",
    "Client replies received (accepted or not).",
    registry=REGISTRY,
)
UPDATES_REJECTED = Counter(
    "fedcommons_updates_rejected",
    "Client replies rejected, by reason (client-error, wrong-round, duplicate, ...).",
    ["reason"],
    registry=REGISTRY,
)
UPLOAD_BYTES = Counter(
    "fedcommons_upload_bytes",
    "Bytes of update payload received from clients.",
    registry=REGISTRY,
)
RELEASES_PUBLISHED = Counter(
    "fedcommons_releases_published",
    "Releases written into the registry.",
    registry=REGISTRY,
)
VALIDATION_DURATION = Histogram(
    "fedcommons_validation_duration_seconds",
    "Wall time of scoring a candidate (per-round validation and the final test).",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
    registry=REGISTRY,
)

ROUND_RETRIES = Counter(
    "fedcommons_round_retries",
    "Round attempts that fell short of min-clients and were retried (on-round-failure=retry).",
    registry=REGISTRY,
)
ROUNDS_COMMITTED = Counter(
    "fedcommons_rounds_committed",
    "Rounds committed durably (checkpoint, round record, ledger).",
    registry=REGISTRY,
)
RUNS = Counter(
    "fedcommons_runs",
    "Runs ended, by outcome (finished, failed, cancelled).",
    ["outcome"],
    registry=REGISTRY,
)
RUNS_RESUMED = Counter(
    "fedcommons_runs_resumed",
    "Runs resumed from a committed round after a restart.",
    registry=REGISTRY,
)

_server_lock = threading.Lock()
_server: tuple[str, int] | None = None


def reply_bytes(content: Any) -> int:
    """Bytes of the array payload of a Flower ``RecordDict`` (what the client uploaded)."""
    total = 0
    for record in content.array_records.values():
        for array in record.values():
            total += len(array.data)
    return total


def serve(port: int, host: str = DEFAULT_HOST) -> tuple[str, int]:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread (once per process).

    A second call returns the address already served. Raises :class:`ConfigError` when
    the port is invalid or taken.
    """
    global _server
    with _server_lock:
        if _server is not None:
            return _server
        if not 0 < port < 65536:
            raise ConfigError(f"metrics port must be in 1..65535, got {port}")
        try:
            start_http_server(port, addr=host, registry=REGISTRY)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        _server = (host, port)
        log.info("metrics.serving", address=f"http://{host}:{port}/metrics")
        return _server


def serve_from_env() -> tuple[str, int] | None:
    """Start the metrics server if ``FEDCOMMONS_METRICS_PORT`` is set; never fail a run.

    A taken port (another run of this coordinator serving already) is logged, not raised.
    """
    raw = os.environ.get(ENV_PORT, "").strip()
    if not raw or raw == "0":
        return None
    try:
        return serve(int(raw), os.environ.get(ENV_HOST, DEFAULT_HOST) or DEFAULT_HOST)
    except (ValueError, ConfigError) as exc:
        log.warning("metrics.not_served", detail=str(exc))
        return None
