"""What every command shares: option types, the error boundary, console and logging."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

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
RunOutOpt = Annotated[
    Path, typer.Option("--out", help="Run folder to write (new; --resume or --overwrite an existing one).")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of config keys (the reference's keys).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="key=value config override, repeatable.")]
ResumeOpt = Annotated[
    bool, typer.Option(help="Continue the run in --out (checked: same settings, features, data); a finished one stays.")
]
OverwriteOpt = Annotated[bool, typer.Option(help="Replace what --out holds (a finished or unfinished run).")]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Memory the command may use, e.g. 16G (default: what is available); its plan is refused beyond it.",
    ),
]
FeatureMemoryOpt = Annotated[
    str | None,
    typer.Option(
        "--feature-memory",
        help="Memory for features, e.g. 8G; beyond it they are read from the cache as needed "
        "(default: what the plan leaves).",
    ),
]
ProfileOpt = Annotated[
    bool,
    typer.Option(
        "--profile",
        envvar="BLOBENC_PROFILE",
        help="Record wall/user/system time, page faults and context switches per phase: profile.json + a table.",
    ),
]
ReportOpt = Annotated[
    bool, typer.Option("--report", help="At the end, write RUN/report.html (needs pip install 'blobenc[report]').")
]


def write_run_report(out: Path, quiet: bool) -> None:
    """`--report`: the run's HTML report, after the run itself is safely written."""
    from blobenc.reporting import write_report

    with errors():
        path = write_report([out], out / "report.html")
    if not quiet:
        console.print(f"report: {path}")


@contextmanager
def computing(profile: bool, where: Callable[[], Path | None], quiet: bool) -> Iterator[None]:
    """What a command that computes does around its library call: torch threads and the allocator
    sized for the cores available (blobenc.runtime.configure_cpu), and with `profile` the run's
    totals and phases written to where()/profile.json and shown as a table (rank 0 only under
    torchrun). Inside `errors()`."""
    from blobenc.profile import profiling
    from blobenc.runtime import configure_cpu

    configure_cpu()
    with profiling(profile) as prof:
        yield
    if prof is None or int(os.environ.get("RANK", 0)) != 0:
        return
    folder = where()
    if folder is not None:
        prof.write(Path(folder) / "profile.json")
    if not quiet:
        console.print(profile_table(prof.to_dict(), f"profile: {folder}/profile.json" if folder else "profile"))


def _count(n: float) -> str:
    return next((f"{n / d:.1f}{u}" for d, u in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if n >= d), f"{n:.0f}")


def profile_table(data: dict, title: str) -> Table:
    """Totals and phases of a profile.json: wall, user and system seconds, sys/user, page faults
    (minor + major) and context switches (voluntary / involuntary), the longest phases first."""
    table = Table(title=title)
    for col in ("phase", "calls", "wall s", "user s", "sys s", "sys/user", "faults", "switches v/i"):
        table.add_column(col, justify="left" if col == "phase" else "right")

    def row(name: str, p: dict, calls: str) -> None:
        ratio = f"{p['sys_s'] / p['user_s']:.3f}" if p["user_s"] > 0 else "-"
        faults = _count(p["minor_faults"] + p["major_faults"])
        switches = f"{_count(p['voluntary_switches'])}/{_count(p['involuntary_switches'])}"
        seconds = (f"{p[k]:.2f}" for k in ("wall_s", "user_s", "sys_s"))
        table.add_row(name, calls, *seconds, ratio, faults, switches)

    for name, p in sorted(data["phases"].items(), key=lambda kv: -kv[1]["wall_s"]):
        row(name, p, _count(p["calls"]))
    total = data["total"]
    row("[bold]total[/]", total, "")
    rt = data.get("runtime", {})
    table.caption = (
        f"total includes child processes; phases nest by '/'; peak RSS {total['peak_rss_bytes'] / 2**30:.2f} GiB; "
        f"{rt.get('torch_threads')} torch threads, {rt.get('cores_available')} cores; malloc: {rt.get('malloc')}"
    )
    return table


@contextmanager
def errors(writes: Path | None = None) -> Iterator[None]:
    """Turn library errors and the filesystem's refusals into one red line and exit code 1;
    nothing else is caught. `writes`: what the command writes, named when the system's error
    names no file (a write that found the disk full)."""
    try:
        yield
    except BlobencError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)  # "[x]" is text
        raise typer.Exit(1) from None
    except OSError as e:  # the filesystem's refusals (read-only, full, not a folder): the path and why
        err_console.print(f"[bold red]error:[/] {escape(os_error_line(e, writes))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print(
            "[bold red]interrupted[/]; what finished is kept: rerun with --resume to go on (extract: rerun as it was)"
        )
        raise typer.Exit(130) from None


_OS_HINTS = {
    errno.ENOSPC: "free space there or write elsewhere",
    errno.EDQUOT: "free space there or write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "check its permissions or write elsewhere",
    errno.EPERM: "check its permissions or write elsewhere",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EEXIST: "remove it or write elsewhere",
}


def os_error_line(e: OSError, writes: Path | None = None) -> str:
    """An OSError as one line: the path(s), the system's reason, what to do about it."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    where = where or (f"writing {writes}" if writes is not None else "a file")
    reason = e.strerror or str(e)
    hint = _OS_HINTS.get(e.errno)
    return f"{where}: {reason}" + (f"; {hint}" if hint else "")


class _FolderOnFirstRecord(logging.FileHandler):
    """A log file whose folder and file appear with the first record: a run refused before any
    work (a bad option, a plan beyond --max-memory) leaves no folder behind."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


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
        fh = _FolderOnFirstRecord(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
