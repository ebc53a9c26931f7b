"""`synth`, `evaluate` and `submit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from blobenc.cli._common import DataOpt, JsonOpt, QuietOpt, SeedOpt, console, errors, setup_logging, write_json
from blobenc.data.algonauts import AlgonautsDataset
from blobenc.data.synth import SynthConfig, write_synthetic
from blobenc.predictions import evaluate, mean_rois, submit


def synth_command(
    out: Annotated[Path, typer.Argument(help="New folder to write the dataset to.")],
    subjects: Annotated[int, typer.Option(help="Number of subjects.")] = SynthConfig.subjects,
    train_images: Annotated[int, typer.Option(help="Training images per subject.")] = SynthConfig.train_images,
    test_images: Annotated[int, typer.Option(help="Test images (shared by all subjects).")] = SynthConfig.test_images,
    vertices: Annotated[str, typer.Option(help="'small' (fast) or 'full' (the real vertex counts).")] = "small",
    image_size: Annotated[int, typer.Option(help="Image side in pixels (real data: 425).")] = SynthConfig.image_size,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Write a synthetic dataset in the Algonauts 2023 layout from a known generative model."""
    setup_logging(quiet)
    with errors():
        cfg = SynthConfig(subjects, train_images, test_images, vertices, image_size, seed)
        write_synthetic(out, cfg, progress=not quiet)
        ds = AlgonautsDataset(out)
    if not quiet:
        table = Table(title=f"synthetic dataset {out}")
        for col in ("subject", "train images", "test images", "lh vertices", "rh vertices"):
            table.add_column(col, justify="right")
        for s in ds.subjects.values():
            table.add_row(
                s.name,
                str(len(s.images["train"])),
                str(len(s.images["test"])),
                str(s.n_vertices["lh"]),
                str(s.n_vertices["rh"]),
            )
        console.print(table)
        console.print(f"group space: {ds.group.n_vertices} vertices, {len(ds.unique_images())} unique images")


def score_table(result: dict, title: str) -> Table:
    table = Table(title=title)
    for col in ("subject", "score (%)", "score, nc>0 (%)", "median r", "mean r", "median R²", "vertices"):
        table.add_column(col, justify="right")
    for name, s in result["subjects"].items():
        table.add_row(
            name,
            f"{s['score']:.2f}",
            f"{s['score_nonzero_nc']:.2f}",
            f"{s['median_r']:.3f}",
            f"{s['mean_r']:.3f}",
            f"{s['median_r2']:.3f}",
            str(s["n_vertices"]),
        )
    table.add_row(
        "[bold]mean",
        f"[bold]{result['score']:.2f}",
        f"[bold]{result['score_nonzero_nc']:.2f}",
        f"{result['median_r']:.3f}",
        "",
        "",
        "",
        end_section=True,
    )
    return table


def roi_table(rois: dict, title: str = "score per ROI (%), mean over subjects", fmt: str = "{:.2f}") -> Table:
    """{group: {roi: {lh, rh}}} as a table."""
    table = Table(title=title)
    for col in ("group", "roi", "lh", "rh"):
        table.add_column(col, justify="right" if col in ("lh", "rh") else "left")
    for group, entries in rois.items():
        for roi, hemis in entries.items():
            table.add_row(group, roi, *(fmt.format(hemis[h]) if hemis[h] is not None else "-" for h in ("lh", "rh")))
    return table


def evaluate_command(
    pred_dir: Annotated[Path, typer.Argument(help="Folder with subjNN/{lh,rh}_pred_test.npy.")],
    data: DataOpt,
    json_out: JsonOpt = None,
    rois: Annotated[bool, typer.Option("--rois/--no-rois", help="Print the per-ROI table.")] = True,
    quiet: QuietOpt = False,
) -> None:
    """Score test predictions with the Algonauts 2023 devkit formula."""
    setup_logging(quiet)
    with errors():
        result = evaluate(pred_dir, AlgonautsDataset(data))
    write_json(json_out, result)
    if quiet:
        console.print(f"{result['score']:.4f}")
        return
    if rois:
        console.print(roi_table(mean_rois([s["rois"] for s in result["subjects"].values()])))
    console.print(score_table(result, f"noise-normalized accuracy of {pred_dir}"))


def submit_command(
    pred_dir: Annotated[Path, typer.Argument(help="Folder with subjNN/{lh,rh}_pred_test.npy for every subject.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="The .zip file to write.")],
    quiet: QuietOpt = False,
) -> None:
    """Check every subject's test predictions and zip them in the challenge layout."""
    setup_logging(quiet)
    with errors():
        path = submit(pred_dir, AlgonautsDataset(data), out)
    if not quiet:
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
