"""The one table every benchmark prints, with the command that produced it."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

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


def synthetic_workdir(workdir: Path | None, prefix: str, config) -> tuple[Path, Path]:
    """(work folder, synthetic dataset in it): the dataset is written once and reused by reruns."""
    from blobenc.data.synth import write_synthetic

    work = Path(workdir or tempfile.mkdtemp(prefix=prefix))
    data = work / "data"
    if not data.exists():
        write_synthetic(data, config)
    return work, data
