"""What every command shares: option types, the error boundary, console and logging."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from blobenc.errors import BlobencError

console = Console()
err_console = Console(stderr=True)

_DATA_HELP = "Dataset root: Algonauts 2023 layout (ROOT/subjNN/...) or generic layout (ROOT/dataset.yaml)."
DataOpt = Annotated[Path, typer.Option("--data", help=_DATA_HELP)]
DataArg = Annotated[Path, typer.Argument(help=_DATA_HELP)]
CacheArg = Annotated[Path, typer.Argument(help="Feature cache (a Zarr v3 group written by `blobenc extract`).")]
ModelOpt = Annotated[str, typer.Option("--model", help="Any timm model name.")]
LayersOpt = Annotated[
    list[str] | None,
    typer.Option("--layers", help="Glob over module names, repeatable (e.g. 'blocks.[02468]'); model order."),
]
PretrainedOpt = Annotated[
    bool, typer.Option("--pretrained/--no-pretrained", help="Download pretrained weights through timm.")
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", help="Local weights file (safetensors or torch state dict).")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random init, crops and splits.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda:N'.")]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help="'auto' (bf16 on capable GPUs, fp32 on CPU), 'fp32', 'bf16', 'fp16'.")
]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON to this file.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables (for scripts).")]
RunOutOpt = Annotated[Path, typer.Option("--out", help="Run folder to write (must be new unless --resume).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of config keys (the reference's keys).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="key=value config override, repeatable.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")]
ReportOpt = Annotated[
    bool, typer.Option("--report", help="At the end, write RUN/report.html (needs pip install 'blobenc[report]').")
]


def write_run_report(out: Path, quiet: bool) -> None:
    """`--report`: the run's HTML report, after the run itself is safely written."""
    from blobenc.report import write_report

    with errors():
        path = write_report([out], out / "report.html")
    if not quiet:
        console.print(f"report: {path}")


@contextmanager
def errors() -> Iterator[None]:
    """Turn library errors into one red line and exit code 1; nothing else is caught."""
    try:
        yield
    except BlobencError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # "[x]" is text
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]; rerun the same command to resume where possible")
        raise typer.Exit(130) from None


def setup_logging(quiet: bool, log_file: Path | None = None) -> None:
    """Rich log handler on stderr (the CLI's alone) and optionally a plain log file."""
    root = logging.getLogger("blobenc")
    root.handlers.clear()
    root.setLevel(logging.INFO)
    root.propagate = False
    handler = RichHandler(console=err_console, show_path=False, show_time=False)
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    root.addHandler(handler)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)


def write_json(path: Path | None, obj: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n")
