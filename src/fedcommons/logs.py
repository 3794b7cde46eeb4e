"""structlog, configured once for every entry point.

Human-readable lines on a terminal, JSON lines otherwise. Round code binds ``run_id``
and ``round`` with :func:`structlog.contextvars.bound_contextvars`, so every line logged
inside a round carries both.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_configured = False


class _StderrLogger:
    """Writes to whatever ``sys.stderr`` is at call time.

    rich's live displays swap ``sys.stderr`` for a proxy that prints above the progress
    bar; looking the stream up per call keeps log lines from tearing the display.
    """

    def msg(self, message: str) -> None:
        stream: TextIO = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = critical = exception = msg


def _stderr_logger_factory(*_args: Any) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """Configure structlog (idempotent: later calls only change the level).

    ``json=None`` picks JSON lines unless stderr is a terminal.
    """
    global _configured
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_stderr_logger_factory,
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """Return a logger for ``name``, configuring defaults on first use.

    The logger is a lazy proxy: it follows later :func:`configure_logging` calls, so
    module-level loggers created at import time honour the level set by the CLI.
    """
    if not _configured:
        configure_logging()
    return structlog.get_logger(component=name)
