"""Options, consoles and parsers shared by the ``fedcommons`` commands."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

DEFAULT_REGISTRY = os.environ.get("FEDCOMMONS_REGISTRY", "fedcommons-registry")
RegistryOpt = Annotated[
    Path, typer.Option("--registry", "-r", help="Registry directory (env FEDCOMMONS_REGISTRY).")
]
LogLevelOpt = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]


class OutputFormat(StrEnum):
    """Output formats of the read commands."""

    table = "table"
    json = "json"


def parse_settings(items: list[str] | None) -> dict[str, object]:
    """Parse ``key=value`` items; values are JSON scalars when they parse, else strings."""
    from fedcommons.errors import ConfigError

    settings: dict[str, object] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"setting {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if isinstance(value, list | dict) or value is None:
            value = raw
        settings[key.strip()] = value
    return settings


def progress_columns() -> tuple:
    """The columns of every fedcommons progress bar: description, bar, n/total, time."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A transient rich progress bar on stderr for long CLI work; yields ``advance(n=1)``.

    ``total`` ``None`` shows a bar of unknown length. Nothing is drawn when stderr is not a
    terminal (CI, pipes), so the commands' output stays parseable.
    """
    from rich.progress import Progress

    with Progress(*progress_columns(), console=err_console, transient=True) as bar:
        task_id = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task_id, n)

        yield advance
