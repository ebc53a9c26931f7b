"""The one table every benchmark prints, with the command that produced it."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table


def report(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=120).print(table)
    print(f"command: python {' '.join(sys.argv)}")
