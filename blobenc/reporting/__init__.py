"""`blobenc report`: one self-contained HTML page of one or several runs (docs/report.md).

Training curves, per-subject and per-ROI tables, score histograms and fsaverage5 surface maps, the
figures drawn by matplotlib (Agg) and nilearn and inlined as PNG `data:` URIs; no network needed to
draw or to open it. Needs the `report` extra (matplotlib, nilearn, jinja2), imported only here.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

from blobenc.errors import ReportError
from blobenc.reporting.runs import Run, check_comparable, read_run

__all__ = ["ReportError", "Run", "read_run", "write_report"]

logger = logging.getLogger(__name__)
EXTRA = ("matplotlib", "nilearn", "jinja2")


def require_extra() -> None:
    """The report's libraries are installed, else one line saying how to get them."""
    missing = [m for m in EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise ReportError(f"the report needs {', '.join(missing)}: pip install 'blobenc[report]'")


def write_report(
    runs: Sequence[Path | str],
    out: Path | str,
    data: Path | str | None = None,
    predictions: Sequence[Path | str | None] | None = None,
    *,
    title: str | None = None,
    subject_maps: bool = True,
) -> Path:
    """Write one HTML report of `runs` (run or sweep folders) to `out` and return its path.

    `data`: the dataset root (default: the one the first run recorded, when it exists), needed for
    maps and test scores. `predictions`: one predictions folder (or None) per run, scored against the
    data's test fMRI (the devkit's noise-normalized accuracy when the data has noise ceilings, else
    Pearson r). `subject_maps`: also draw small flat maps of every subject.

    Training commands call it with their own run folder: `write_report([out], out / "report.html")`.
    """
    require_extra()
    from blobenc.reporting.compare import is_comparison, write_compare_report

    if len(runs) == 1 and is_comparison(Path(runs[0])):  # a `blobenc compare` folder has its own page
        if predictions:
            raise ReportError(f"{runs[0]}: a comparison folder scores itself; --predictions is for runs")
        if Path(out).suffix.lower() not in (".html", ".htm"):
            raise ReportError(f"{out}: the report file must end in .html")
        return write_compare_report(runs[0], out, data, title)
    if any(is_comparison(Path(r)) for r in runs):
        raise ReportError("a comparison folder (blobenc compare) is reported on its own: give it alone")
    from blobenc.reporting.page import Page, render, write_html
    from blobenc.reporting.scores import check_run_data, open_data, score_predictions

    out = Path(out)
    if not runs:
        raise ReportError("no run folders given")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ReportError(f"{out}: the report file must end in .html")
    predictions = list(predictions or [])
    if predictions and len(predictions) != len(runs):
        raise ReportError(f"{len(predictions)} predictions folders for {len(runs)} runs: give one per run, in order")
    loaded: list[Run] = []
    for path in runs:
        loaded.append(read_run(path, {r.label for r in loaded}))
    check_comparable(loaded)

    notes = []
    root = Path(data) if data is not None else None
    if root is None:
        recorded = [Path(r.data_path) for r in loaded if r.data_path]
        root = next((p for p in recorded if p.is_dir()), None)
        if root is None and recorded:
            notes.append(f"the runs' dataset {recorded[0]} is not here: pass --data for maps and test scores")
    dataset = open_data(root) if root is not None else None
    if dataset is not None:
        for run in loaded:
            check_run_data(run, dataset)
    for run, pred in zip(loaded, predictions or [None] * len(loaded), strict=True):
        if pred is None:
            continue
        if dataset is None:
            raise ReportError(f"{pred}: scoring predictions needs the dataset: pass --data ROOT")
        run.test = score_predictions(pred, dataset)
        if run.test is None:
            run.notes.append(f"{pred}: not scored, the data has no test fMRI")

    page = Page(loaded, dataset, str(root) if root is not None else None, subject_maps)
    page.notes += notes
    context = page.context(title)
    return write_html(render(context), out)
