"""`fit-ridge`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from blobenc.cli._common import (
    CacheArg,
    DataOpt,
    DeviceOpt,
    FeatureMemoryOpt,
    MaxMemoryOpt,
    OverwriteOpt,
    ProfileOpt,
    QuietOpt,
    ReportOpt,
    computing,
    console,
    errors,
    setup_logging,
    write_run_report,
)
from blobenc.cli.data import roi_table
from blobenc.cli.train import validation_table


def fit_ridge_command(
    cache: CacheArg,
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Run folder to write (new, or --overwrite).")],
    features: Annotated[
        str, typer.Option(help="Per layer: mean (over tokens/positions), cls, tokens (all), pool=N (N x N grid).")
    ] = "mean",
    layers: Annotated[
        list[str] | None, typer.Option("--layers", help="Cache layers to use (globs, repeatable; default all).")
    ] = None,
    alphas: Annotated[
        str | None, typer.Option(help="Comma-separated alphas (default: 22 log-spaced, scaled to the kernel's trace).")
    ] = None,
    banded: Annotated[bool, typer.Option(help="One kernel per layer, per-vertex layer weights (himalaya).")] = False,
    n_iter: Annotated[int, typer.Option(help="--banded: random-search draws of layer weightings.")] = 20,
    cv: Annotated[int, typer.Option(help="--banded: cross-validation folds, by image.")] = 5,
    val_fraction: Annotated[float, typer.Option(help="Validation images (same split as fit-head's).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split (and banded search) seed; fit-head's default is 0.")] = 0,
    refit: Annotated[bool, typer.Option(help="Refit on every training image for the predictions.")] = True,
    overwrite: OverwriteOpt = False,
    max_memory: MaxMemoryOpt = None,
    feature_memory: FeatureMemoryOpt = None,
    device: DeviceOpt = "auto",
    report: ReportOpt = False,
    profile: ProfileOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit a (banded) ridge per subject on cached features: the baseline every head must beat."""
    from blobenc import api
    from blobenc.errors import ConfigError

    setup_logging(quiet)
    with errors(out):
        try:
            alpha_values = tuple(float(a) for a in alphas.split(",")) if alphas else None
        except ValueError:
            raise ConfigError(f"--alphas {alphas!r}: expected comma-separated numbers") from None
        with computing(profile, lambda: out, quiet):
            summary = api.fit_ridge(
                cache, data, out, features=features, layers=layers, alphas=alpha_values, banded=banded,
                n_iter=n_iter, cv=cv, val_fraction=val_fraction, seed=seed, refit=refit, max_memory=max_memory,
                feature_memory=feature_memory, device=device, progress=not quiet, overwrite=overwrite,
            )  # fmt: skip
    if summary is None:  # under torchrun only rank 0 reports
        return
    if not quiet:
        print_summary(summary, out)
    if report:
        write_run_report(out, quiet)


def print_summary(summary: dict, out) -> None:
    table = Table(title=f"fit-ridge {out}")
    for col in ("subject", "solver", "features", "alpha median", "val median R²", "mean r", "seconds"):
        table.add_column(col, justify="right")
    for r in summary["subjects"]:
        v = r["val"] or {}
        table.add_row(
            r["subject"],
            r["solver"],
            r["features"],
            f"{r['alpha_median']:.3g}",
            f"{v.get('median_r2', float('nan')):.4f}",
            f"{v.get('mean_r', float('nan')):.4f}",
            f"{r['seconds']:.1f}",
        )
    console.print(table)
    console.print(validation_table(summary, f"fit-ridge {out}: validation"))
    console.print(roi_table(summary["val_rois"], "validation R² per ROI, mean over subjects", "{:.4f}"))
    console.print(f"{summary['seconds']:.1f} s")
