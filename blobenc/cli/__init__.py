"""The `blobenc` command-line app: one Typer app, one module per command group."""

from __future__ import annotations

import typer

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
app.command("finetune")(finetune_command)
app.command("predict")(predict_command)
app.command("import-reference")(import_reference_command)
app.command("evaluate")(evaluate_command)
app.command("submit")(submit_command)
app.command("report")(report_command)


def main() -> None:
    app()
