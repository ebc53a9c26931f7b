"""`synth`, `evaluate` and `submit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from blobenc.cli._common import DataOpt, JsonOpt, QuietOpt, SeedOpt, console, errors, setup_logging
from blobenc.data import open_dataset
from blobenc.data.base import Dataset
from blobenc.data.synth import SynthConfig, write_synthetic
from blobenc.files import write_json
from blobenc.scoring import mean_rois


def synth_command(
    out: Annotated[Path, typer.Argument(help="New folder to write the dataset to.")],
    subjects: Annotated[int, typer.Option(help="Number of subjects.")] = SynthConfig.subjects,
    train_images: Annotated[int, typer.Option(help="Training images per subject.")] = SynthConfig.train_images,
    test_images: Annotated[int, typer.Option(help="Test images (shared by all subjects).")] = SynthConfig.test_images,
    vertices: Annotated[str, typer.Option(help="'small' (fast) or 'full' (the real vertex counts).")] = "small",
    image_size: Annotated[int, typer.Option(help="Image side in pixels (real data: 425).")] = SynthConfig.image_size,
    layout: Annotated[
        str, typer.Option(help="'algonauts' (ROOT/subjNN/...) or 'generic' (dataset.yaml, one row per presentation).")
    ] = "algonauts",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Write a synthetic dataset (Algonauts 2023 or generic layout) from a known generative model."""
    setup_logging(quiet)
    with errors(out):
        cfg = SynthConfig(subjects, train_images, test_images, vertices, image_size, seed, layout)
        write_synthetic(out, cfg, progress=not quiet)
        ds = open_dataset(out)
    if not quiet:
        console.print(dataset_table(ds, f"synthetic dataset {out}"))


def dataset_table(ds: Dataset, title: str) -> Table:
    """Subjects, rows, unique images and targets of a dataset of any layout."""
    table = Table(title=title, caption=_group_caption(ds))
    parts = [p for p in next(iter(ds.subjects.values())).parts if p != "all"]
    columns = ["subject", "train rows", "train images", "test rows", "test responses", "targets", *parts]
    columns += ["noise ceiling", "ROI groups"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("subject", "ROI groups") else "right")
    for s in ds.subjects.values():
        nc = s.noise_ceiling()
        table.add_row(
            s.name,
            str(len(s.keys["train"])),
            str(len(set(s.keys["train"]))),
            str(len(s.keys.get("test", ()))),
            "yes" if s.has_responses("test") else "-",
            str(s.n_targets),
            *(str(int(m.sum())) for p, m in s.parts.items() if p in parts),
            f"mean {nc.mean():.3f}" if nc is not None else "-",
            ", ".join(s.rois()) or "-",
        )
    return table


def _group_caption(ds: Dataset) -> str:
    surface = f", {ds.group.surface} surface" if ds.group.surface else ""
    return (
        f"{ds.layout} layout; group space: {ds.group.n_targets} of {ds.group.size} targets{surface}; "
        f"{len(ds.unique_images())} unique images"
    )


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def score_table(result: dict, title: str) -> Table:
    """Per-subject scores; the noise-normalized columns show '-' where a subject has no ceiling."""
    table = Table(title=title)
    for col in ("subject", "score (%)", "score, nc>0 (%)", "median r", "mean r", "median R²", "targets"):
        table.add_column(col, justify="right")
    for name, s in result["subjects"].items():
        table.add_row(
            name,
            _fmt(s["score"], ".2f"),
            _fmt(s["score_nonzero_nc"], ".2f"),
            f"{s['median_r']:.3f}",
            f"{s['mean_r']:.3f}",
            f"{s['median_r2']:.3f}",
            str(s["n_vertices"]),
        )
    table.add_row(
        "[bold]mean",
        f"[bold]{_fmt(result['score'], '.2f')}",
        f"[bold]{_fmt(result['score_nonzero_nc'], '.2f')}",
        f"{result['median_r']:.3f}",
        _fmt(result.get("mean_r"), ".3f"),
        _fmt(result.get("median_r2"), ".3f"),
        "",
        end_section=True,
    )
    return table


def roi_table(rois: dict, title: str = "score per ROI (%), mean over subjects", fmt: str = "{:.2f}") -> Table:
    """{group: {roi: {part: value}}} as a table: one column per part (lh, rh; or all)."""
    table = Table(title=title)
    parts = list(dict.fromkeys(p for entries in rois.values() for values in entries.values() for p in values))
    for col in ("group", "roi", *parts):
        table.add_column(col, justify="right" if col in parts else "left")
    for group, entries in rois.items():
        for roi, values in entries.items():
            table.add_row(group, roi, *(fmt.format(values[p]) if values.get(p) is not None else "-" for p in parts))
    return table


def evaluate_command(
    pred_dir: Annotated[
        Path, typer.Argument(help="Folder with subjNN/{lh,rh}_pred_test.npy (Algonauts) or <name>/pred_test.npy.")
    ],
    data: DataOpt,
    json_out: JsonOpt = None,
    rois: Annotated[bool, typer.Option("--rois/--no-rois", help="Print the per-ROI table.")] = True,
    quiet: QuietOpt = False,
) -> None:
    """Score test predictions: the Algonauts 2023 devkit formula where noise ceilings exist, r and R² always."""
    from blobenc import api

    setup_logging(quiet)
    with errors():
        result = api.evaluate(pred_dir, data)
    if json_out is not None:
        write_json(json_out, result)
    normalized = result["score"] is not None
    if quiet:
        console.print(f"{result['score'] if normalized else result['median_r']:.4f}")
        return
    if rois:
        tables = [s["rois"] for s in result["subjects"].values() if s["rois_metric"] == "score"]
        title = "score per ROI (%), mean over subjects"
        if not tables:
            tables, title = [s["rois"] for s in result["subjects"].values()], "Pearson r per ROI, mean over subjects"
        rows = mean_rois(tables)
        if rows:
            console.print(roi_table(rows, title, "{:.2f}" if tables and normalized else "{:.3f}"))
    title = f"noise-normalized accuracy of {pred_dir}" if normalized else f"scores of {pred_dir} (no noise ceilings)"
    console.print(score_table(result, title))


def submit_command(
    pred_dir: Annotated[Path, typer.Argument(help="Folder with subjNN/{lh,rh}_pred_test.npy for every subject.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="The .zip file to write.")],
    quiet: QuietOpt = False,
) -> None:
    """Check every subject's test predictions and zip them in the challenge layout."""
    from blobenc import api

    setup_logging(quiet)
    with errors(out):
        path = api.submit(pred_dir, data, out)
    if not quiet:
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
