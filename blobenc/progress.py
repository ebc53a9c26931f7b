"""Rich progress for library loops; every loop takes a `progress` flag so scripts stay quiet."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
_console = Console(stderr=True)


def make_progress(*extra_columns, enabled: bool = True) -> Progress:
    """A progress display on stderr: description, bar, count, rate columns, elapsed and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=_console,
        disable=not enabled,
        transient=False,
    )


def track(items: Iterable[T], description: str, enabled: bool, total: int | None = None) -> Iterator[T]:
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with make_progress(enabled=enabled) as progress:
        yield from progress.track(items, total=total, description=description)
