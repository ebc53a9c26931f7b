"""Memory plans against measured peaks: fit-head and fit-ridge on their defaults, each as its own
process, the plan's estimate (the `plan:` line the command logs before any work) next to the peak
anonymous memory the kernel reports for it (RssAnon of /proc/PID/status, polled every 20 ms:
memory-mapped responses and the page cache left out, as the plan leaves them out).

    python benchmarks/plan.py --pair DATA CACHE [--pair DATA CACHE ...] [--workdir /tmp/bench-plan]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path

from _measure import measured
from _report import report

PLAN = re.compile(r"peaks at ~([0-9.]+) GB")


def plan_and_peak(cmd: list[str], log: Path) -> tuple[float, float, float]:
    """(plan bytes, measured peak anonymous bytes, wall s) of one command."""
    env = os.environ | {"COLUMNS": "400", "HF_HUB_OFFLINE": "1"}  # the plan line unwrapped
    m = measured(cmd, env, log, poll_s=0.02)
    return float(PLAN.search(log.read_text()).group(1)) * 1e9, m["anon_gb"] * 1e9, m["wall"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", nargs=2, action="append", metavar=("DATA", "CACHE"), required=True)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-plan")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for data, cache in args.pair:
        for command in ("fit-head", "fit-ridge"):
            out = args.workdir / f"{Path(data).name}-{command}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = ["blobenc", command, cache, "--data", data, "--out", str(out)]
            estimate, peak, wall = plan_and_peak(cmd, args.workdir / f"{out.name}.log")
            rows.append((f"{command} on {Path(data).name}: plan / measured peak anonymous GB (ratio), wall s",
                         f"{estimate / 1e9:.2f} / {peak / 1e9:.2f} ({estimate / peak:.2f}), {wall:.0f}"))  # fmt: skip
    report("Memory plans against measured peaks", rows)


if __name__ == "__main__":
    main()
