"""In-memory against streaming fit-head: one run, one table (docs/benchmarks.md records the figures).

    python benchmarks/streaming.py CACHE --data ROOT [--max-memory 64M] [--epochs 2]

Runs `blobenc fit-head` twice in subprocesses on the same cache, once with the
needed features in RAM and once streamed by chunks under --max-memory, and
reports samples/s and each process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _report import report

_CHILD = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    if sys.argv[1:]:
        runpy.run_module("blobenc", run_name="__main__")
    else:
        import blobenc.cli, blobenc.train.fit  # the import floor: torch, timm, zarr, sklearn
finally:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def peak_rss(args: list[str]) -> float:
    """Peak resident memory (MB) of a `blobenc ...` process; no args: of importing blobenc only."""
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, "blobenc", *args],
        capture_output=True,
        text=True,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    if res.returncode not in (0, None):
        raise RuntimeError(res.stderr[-2000:])
    return int(res.stderr.strip().splitlines()[-1]) / 1024


def run(cache: Path, data: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """(samples/s, peak RSS in MB) of one fit-head process."""
    peak = peak_rss(["fit-head", str(cache), "--data", str(data), "--out", str(out), "--quiet", *extra])
    summary = json.loads((out / "summary.json").read_text())
    return summary["samples_per_s"], peak


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--max-memory", default="64M")
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="blobenc-bench-stream-"))
    common = ["--set", f"epochs={args.epochs}", "--set", "batch_size=64", "--set", "hidden_dim=256"]
    floor = peak_rss([])
    stream_rate, stream_peak = run(args.cache, args.data, work / "stream", [*common, "--max-memory", args.max_memory])
    mem_rate, mem_peak = run(args.cache, args.data, work / "memory", common)
    cache_mb = sum(f.stat().st_size for f in args.cache.rglob("*") if f.is_file()) / 1e6
    report(
        f"fit-head in memory vs streaming: {args.cache} ({cache_mb:.0f} MB), {args.epochs} epochs",
        [
            ("in memory (samples/s)", f"{mem_rate:.1f}"),
            (f"streaming, --max-memory {args.max_memory} (samples/s)", f"{stream_rate:.1f}"),
            ("[bold]ratio streaming / in memory", f"[bold]{stream_rate / mem_rate:.2f}"),
            ("peak RSS, importing blobenc only (MB)", f"{floor:.0f}"),
            ("peak RSS, streaming (MB)", f"{stream_peak:.0f}"),
            ("peak RSS, in memory (MB)", f"{mem_peak:.0f}"),
        ],
    )


if __name__ == "__main__":
    main()
