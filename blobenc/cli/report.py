"""`report`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from blobenc.cli._common import QuietOpt, console, errors, setup_logging


def report_command(
    runs: Annotated[list[Path], typer.Argument(help="Run or sweep folders; several are compared side by side.")],
    out: Annotated[Path, typer.Option("--out", help="The .html file to write.")],
    data: Annotated[
        Path | None, typer.Option("--data", help="Dataset root, for maps and test scores (default: the run's own).")
    ] = None,
    predictions: Annotated[
        list[Path] | None,
        typer.Option("--predictions", help="Predictions folder to score, one per run in order (repeatable)."),
    ] = None,
    title: Annotated[str | None, typer.Option(help="Page title.")] = None,
    subject_maps: Annotated[
        bool, typer.Option("--subject-maps/--no-subject-maps", help="Also draw small flat maps of every subject.")
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """Write one self-contained HTML page of runs: curves, tables, histograms and fsaverage maps."""
    from blobenc import api

    setup_logging(quiet)
    t0 = time.perf_counter()
    with errors(out):
        path = api.report(runs, out, data, predictions, title=title, subject_maps=subject_maps)
    if not quiet:
        size = path.stat().st_size / 1e6
        console.print(f"wrote {path} ({size:.1f} MB) in {time.perf_counter() - t0:.1f} s")
