"""The `blobenc` command-line app: one Typer app, one module per command group."""

from __future__ import annotations

import os

import typer

from blobenc.cli.compare import compare_command
from blobenc.cli.data import evaluate_command, submit_command, synth_command
from blobenc.cli.features import extract_command, info_command, layers_command
from blobenc.cli.report import report_command
from blobenc.cli.ridge import fit_ridge_command
from blobenc.cli.train import finetune_command, fit_head_command, import_reference_command, predict_command

app = typer.Typer(
    name="blobenc",
    help="Image-computable fMRI encoding models: extract timm features, fit heads, predict, score.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)
app.command("synth")(synth_command)
app.command("extract")(extract_command)
app.command("layers")(layers_command)
app.command("info")(info_command)
app.command("fit-head")(fit_head_command)
app.command("fit-ridge")(fit_ridge_command)
app.command("compare")(compare_command)
app.command("finetune")(finetune_command)
app.command("predict")(predict_command)
app.command("import-reference")(import_reference_command)
app.command("evaluate")(evaluate_command)
app.command("submit")(submit_command)
app.command("report")(report_command)


def main() -> None:
    # Before torch is imported (commands import it lazily): OpenMP threads that finish a parallel
    # region sleep instead of spinning. Spinning burned over half the CPU time of a training step
    # when other processes share the cores (docs/benchmarks.md, "Where the CPU time goes").
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()
