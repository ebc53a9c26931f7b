"""`fit-head` and `predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from blobenc.cli._common import (
    CacheArg,
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    FeatureMemoryOpt,
    JsonOpt,
    MaxMemoryOpt,
    OverwriteOpt,
    PrecisionOpt,
    ProfileOpt,
    QuietOpt,
    ReportOpt,
    ResumeOpt,
    RunOutOpt,
    SetOpt,
    computing,
    console,
    errors,
    setup_logging,
    write_run_report,
)
from blobenc.cli.data import roi_table, score_table
from blobenc.files import write_json

CheckpointMinutesOpt = Annotated[
    float,
    typer.Option(
        "--checkpoint-minutes",
        help="Write the last weights and training state (for --resume) this often; also at the end and on Ctrl-C.",
    ),
]


def validation_table(summary: dict, title: str) -> Table:
    """Per-subject and group validation scores of a run summary."""
    table = Table(title=title)
    for col in ("subject", "median R²", "mean r", "val samples"):
        table.add_column(col, justify="right")
    for name, s in summary["val"]["subjects"].items():
        table.add_row(name, f"{s['median_r2']:.4f}", f"{s['mean_r']:.4f}", str(s["n"]))
    table.add_row("[bold]group", f"[bold]{summary['val']['median_r2']:.4f}", f"{summary['val']['mean_r']:.4f}", "")
    return table


def fit_head_command(
    cache: CacheArg,
    data: DataOpt,
    out: RunOutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    sweep: Annotated[
        list[str] | None,
        typer.Option(
            "--sweep", help="key=v1,v2,... repeatable: every combination, one pass (with --search: key=lo:hi too)."
        ),
    ] = None,
    search: Annotated[
        int | None,
        typer.Option("--search", help="Draw N configs over the --sweep keys (quasi-random) instead of the grid."),
    ] = None,
    halving: Annotated[
        bool, typer.Option("--halving", help="Successive halving: the worse half stops at each rung.")
    ] = False,
    ensemble: Annotated[
        int | None,
        typer.Option("--ensemble", help="K heads averaged at prediction: K seeds of one config, or a sweep's best K."),
    ] = None,
    pca: Annotated[Path | None, typer.Option("--pca", help="Reuse a group PCA file instead of fitting one.")] = None,
    pca_components: Annotated[
        int | None, typer.Option(help="PCA components (= proj_dim; default: from the training samples, 2048 at most).")
    ] = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    checkpoint_minutes: CheckpointMinutesOpt = 10.0,
    max_memory: MaxMemoryOpt = None,
    feature_memory: FeatureMemoryOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    profile: ProfileOpt = False,
    report: ReportOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fit the group PCA and train the multi-subject head from a feature cache (phase 1)."""
    from blobenc import api

    setup_logging(quiet, out / "log.txt")
    with errors(out), computing(profile, lambda: out, quiet):
        summary = api.fit_head(
            cache, data, out, config=config, settings=set_, sweep=sweep, search=search, halving=halving,
            ensemble=ensemble, pca=pca, pca_components=pca_components, resume=resume, overwrite=overwrite,
            checkpoint_minutes=checkpoint_minutes, max_memory=max_memory, feature_memory=feature_memory,
            device=device, precision=precision, progress=not quiet,
        )  # fmt: skip
    if summary is not None and report:  # under torchrun only rank 0 reports
        write_run_report(out, quiet)
    if quiet or summary is None:
        return
    table = Table(title=f"fit-head {out}: validation (best epoch per trial)")
    for col in ("trial", "best epoch", "median R²", "swept"):
        table.add_column(col, justify="right")
    swept = {k for item in sweep or [] for k in [item.partition("=")[0].strip()]}
    if search and not sweep:
        swept = {"lr", "weight_decay", "dropout"}
    for row in summary["trials"]:
        cfg = ", ".join(f"{k}={_short(row['config'][k])}" for k in sorted(swept))
        status = f"{row['median_r2']:.4f}" + (" (failed)" if row["failed"] else "")
        if row.get("stopped"):
            status += " (halved)" if row["stopped"].startswith("halving") else " (early stop)"
        table.add_row(row["dir"], str(row["best_epoch"]) if row["best_epoch"] >= 0 else "start", status, cfg)
    console.print(table)
    if "ensemble" in summary:
        e = summary["ensemble"]
        console.print(f"ensemble of {', '.join(e['members'])}: validation median R² {e['val']['median_r2']:.4f}")
    best = f"epoch {summary['best_epoch']}" if summary["best_epoch"] >= 0 else "its closed-form start"
    console.print(validation_table(summary, f"best: {summary['trial']}, {best}"))
    console.print(roi_table(summary["val_rois"], "validation R² per ROI (best trial), mean over subjects", "{:.4f}"))
    console.print(f"{summary['samples_per_s']:.0f} samples/s per pass, {summary['seconds']:.1f} s")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def predict_command(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="A run folder (fit-head, sweep, finetune, fit-ridge); several with --select.", metavar="RUN..."
        ),
    ],
    data: DataOpt,
    out: Annotated[
        Path,
        typer.Option("--out", help="Folder for subjNN/{lh,rh}_pred_<split>.npy (generic: <name>/pred_<split>.npy)."),
    ],
    subject: Annotated[str, typer.Option("--subject", help="subjNN or 'all'.")] = "all",
    split: Annotated[str, typer.Option(help="test or train.")] = "test",
    cache: Annotated[Path | None, typer.Option(help="Feature cache (default: the one the run used).")] = None,
    images: Annotated[
        Path | None, typer.Option(help="Any folder of images: writes subjNN/{lh,rh}_pred_images.npy + images.txt.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    block_images: Annotated[
        int, typer.Option(help="Images predicted at a time per subject (memory: their inputs and outputs).")
    ] = 2048,
    max_memory: MaxMemoryOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    select: Annotated[
        str | None,
        typer.Option(
            help="With several runs: 'stack' (default) weights them per vertex by non-negative least squares "
            "on the validation responses, cross-fitted; 'vertex' takes per vertex the run with the best "
            "validation r, 'subject' per subject."
        ),
    ] = None,
    json_out: JsonOpt = None,
    profile: ProfileOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Predict subjects' responses in their own vertex space; scores itself when test fMRI exist."""
    from blobenc import api

    setup_logging(quiet)
    with errors(out), computing(profile, lambda: out, quiet):
        result = api.predict(
            runs, data, out, subject=subject, split=split, cache=cache, images=images, batch_size=batch_size,
            block_images=block_images, max_memory=max_memory, device=device, precision=precision,
            select=select, progress=not quiet,
        )  # fmt: skip
    if result is None:  # under torchrun only rank 0 reports
        return
    scores = result
    if "selection" in result:
        scores = result["scores"]
        if not quiet:
            console.print(selection_table(result["selection"]))
    if scores:
        from blobenc.scoring import summarize

        result = summarize(scores)
        if json_out is not None:
            write_json(json_out, result)
        if not quiet:
            console.print(score_table(result, f"predictions in {out}"))
    elif not quiet:
        console.print(f"wrote predictions to {out}")


def selection_table(selection: dict) -> Table:
    """Per subject: each run's mean weight and validation score, and the combination's."""
    metric = next(iter(selection["subjects"].values()))["val"]["metric"]
    table = Table(title=f"--select {selection['select']}: mean weight of each run (validation {metric})")
    table.add_column("subject")
    for k, run in enumerate(selection["runs"]):
        table.add_column(f"run {k + 1}: {Path(run).name}", justify="right")
    table.add_column("combined", justify="right")
    for name, s in selection["subjects"].items():
        cells = [f"{share:.2f} ({v:.4f})" for share, v in zip(s["share"], s["val"]["runs"], strict=True)]
        table.add_row(name, *cells, f"{s['val']['selected']:.4f}")
    return table


def import_reference_command(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="The reference head checkpoint (torch).")],
    pca: Annotated[Path, typer.Option("--pca", help="The reference group PCA state dict (torch).")],
    cache: Annotated[Path, typer.Option("--cache", help="A cache of the reference trunk's layers.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder to write.")],
    data: Annotated[Path | None, typer.Option("--data", help="Dataset whose group space the PCA is in.")] = None,
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Cache layers, one per projection.")] = None,
) -> None:
    """Import the reference release's head and group PCA (loaded with weights_only=True) as a run."""
    from blobenc.reference import import_reference

    with errors(out):
        path = import_reference(checkpoint, pca, cache, out, data, layers)
    console.print(f"imported into {path}; `blobenc predict {path} --data ROOT --out PRED` uses it")


def finetune_command(
    run: Annotated[Path, typer.Argument(help="A fit-head run (or sweep: its best trial).")],
    data: DataOpt,
    out: RunOutOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    unfreeze: Annotated[
        list[str] | None,
        typer.Option(
            "--unfreeze",
            help="Trunk parameter glob to train (default auto: blocks.*.attn.** where the trunk has attention blocks, "
            "else the deepest cached layer's module).",
        ),
    ] = None,
    freeze: Annotated[
        list[str] | None, typer.Option("--freeze", help="Trunk parameter glob kept frozen (norm layers always are).")
    ] = None,
    grad_checkpointing: Annotated[bool, typer.Option(help="Recompute trunk activations in backward.")] = False,
    max_memory: MaxMemoryOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    checkpoint_minutes: CheckpointMinutesOpt = 10.0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    profile: ProfileOpt = False,
    report: ReportOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune trunk (attention blocks) and head end to end on streamed, augmented images (phase 2)."""
    from blobenc import api

    setup_logging(quiet, out / "log.txt")
    with errors(out), computing(profile, lambda: out, quiet):
        summary = api.finetune(
            run, data, out, config=config, settings=set_, unfreeze=unfreeze, freeze=freeze,
            grad_checkpointing=grad_checkpointing, resume=resume, overwrite=overwrite,
            checkpoint_minutes=checkpoint_minutes, max_memory=max_memory, device=device, precision=precision,
            progress=not quiet,
        )  # fmt: skip
    if summary is not None and report:
        write_run_report(out, quiet)
    if quiet or summary is None:
        return
    console.print(validation_table(summary, f"finetune {out}: best epoch {summary['best_epoch']}"))
    console.print(
        f"{summary['trainable_parameters']:,} trainable parameters; "
        f"{summary['samples_per_s']:.1f} samples/s, {summary['seconds']:.1f} s"
    )
