"""A progress bar for the benchmarks' long loops (rich, on stderr, gone when done)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track

T = TypeVar("T")
_stderr = Console(stderr=True)


def steps(items: Iterable[T], description: str) -> Iterator[T]:
    """Iterate ``items`` with a transient bar (drawn only when stderr is a terminal)."""
    items = list(items)
    yield from track(items, description=description, console=_stderr, transient=True)
