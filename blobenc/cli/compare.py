"""`compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from blobenc.cli._common import (
    DataOpt,
    DeviceOpt,
    MaxMemoryOpt,
    ProfileOpt,
    QuietOpt,
    computing,
    console,
    errors,
    setup_logging,
)


def compare_command(
    caches: Annotated[list[Path], typer.Argument(help="Feature caches to compare (one per model).")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", help="Comparison folder (a rerun with the same options resumes).")],
    layers: Annotated[
        list[str] | None, typer.Option("--layers", help="Layers to score, globs over every cache (repeatable).")
    ] = None,
    features: Annotated[
        str, typer.Option(help="Per layer: mean (over tokens/positions), cls, tokens (all), pool=N (N x N grid).")
    ] = "mean",
    alphas: Annotated[
        str | None, typer.Option(help="Comma-separated alphas (default: 22 log-spaced, scaled to the kernel's trace).")
    ] = None,
    all_layers: Annotated[
        bool, typer.Option("--all-layers/--no-all-layers", help="Also each cache's selected layers together.")
    ] = True,
    partition: Annotated[
        list[str] | None,
        typer.Option(
            "--partition",
            help="Variance partitioning: give twice, feature sets A then B, each a cache's label (its folder name) "
            "or LABEL:GLOB for a layer group.",
        ),
    ] = None,
    n_iter: Annotated[int, typer.Option(help="--partition: banded ridge's random-search draws.")] = 20,
    cv: Annotated[int, typer.Option(help="--partition: cross-validation folds of the banded ridge, by image.")] = 5,
    val_fraction: Annotated[float, typer.Option(help="Validation images (same split as fit-head's).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split (and banded search) seed; fit-head's default is 0.")] = 0,
    shard: Annotated[
        str | None, typer.Option(help="i/n: do the i-th of n shares of the work (0-based); torchrun shares by RANK.")
    ] = None,
    max_memory: MaxMemoryOpt = None,
    device: DeviceOpt = "auto",
    profile: ProfileOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Score every layer of every cache per region: a model x layer leaderboard, variance partitioning."""
    from blobenc import api
    from blobenc.errors import ConfigError

    setup_logging(quiet)
    with errors():
        try:
            alpha_values = tuple(float(a) for a in alphas.split(",")) if alphas else None
        except ValueError:
            raise ConfigError(f"--alphas {alphas!r}: expected comma-separated numbers") from None
        if partition and len(partition) != 2:
            raise ConfigError(f"--partition given {len(partition)} times: give it twice, feature sets A then B")
        with computing(profile, lambda: out, quiet):
            summary = api.compare(
                caches, data, out, features=features, layers=layers, alphas=alpha_values, all_layers=all_layers,
                partition=partition, n_iter=n_iter, cv=cv, val_fraction=val_fraction, seed=seed, shard=shard,
                max_memory=max_memory, device=device, progress=not quiet,
            )  # fmt: skip
    if summary is None:
        if not quiet:
            console.print(f"{out}: this share is done; the tables are written when every share is")
        return
    if not quiet:
        print_summary(summary, out)


def print_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"compare {out}: validation R², mean over subjects and targets")
    for col in ("model", "layer", "depth", "val R²", "val r", "test score"):
        table.add_column(col, justify="right")
    for r in summary["overall"]:
        depth = "–" if r["depth"] is None else f"{r['depth']:.2f}"
        score = "–" if r["test_score"] is None else f"{r['test_score']:.2f}"
        table.add_row(r["model"], r["layer"], depth, f"{r['val_r2']:.4f}", f"{r['val_r']:.4f}", score)
    console.print(table)
    best = Table(title="best model per ROI (its best layer)")
    for col in ("group", "roi", "model", "layer", "depth", "val R²", "margin"):
        best.add_column(col, justify="right")
    for r in summary["best_models"]:
        margin = "–" if r["margin"] is None else f"{r['margin']:.4f}"
        best.add_row(r["group"], r["roi"], r["model"], r["layer"], f"{r['depth']:.2f}", f"{r['val_r2']:.4f}", margin)
    console.print(best)
    if "partition" in summary:
        p = summary["partition"]
        part = Table(title=f"variance partition, A = {p['a']}, B = {p['b']} (validation R², mean per target)")
        for col in ("group", "roi", "A", "B", "A+B", "unique A", "unique B", "shared"):
            part.add_column(col, justify="right")
        for r in p["rois"]:
            cells = [r[k] for k in ("r2_a", "r2_b", "r2_ab", "unique_a", "unique_b", "shared")]
            part.add_row(r["group"], r["roi"], *("–" if v is None else f"{v:.4f}" for v in cells))
        console.print(part)
