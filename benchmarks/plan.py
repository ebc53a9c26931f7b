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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import report

PLAN = re.compile(r"peaks at ~([0-9.]+) GB")


def rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak anonymous bytes, output) of one command, which must succeed."""
    env = os.environ | {"COLUMNS": "400", "HF_HUB_OFFLINE": "1"}  # the plan line unwrapped
    t0, peak = time.perf_counter(), 0
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, text=True)
        while proc.poll() is None:
            peak = max(peak, rss_anon(proc.pid))
            time.sleep(0.02)
        log.seek(0)
        out = log.read()
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out[-3000:]}")
    return time.perf_counter() - t0, peak, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pair", nargs=2, action="append", metavar=("DATA", "CACHE"), required=True)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-plan")
    args = ap.parse_args()
    rows = []
    for data, cache in args.pair:
        for command in ("fit-head", "fit-ridge"):
            out = args.workdir / f"{Path(data).name}-{command}"
            shutil.rmtree(out, ignore_errors=True)
            wall, peak, log = measured(["blobenc", command, cache, "--data", data, "--out", str(out)])
            estimate = float(PLAN.search(log).group(1)) * 1e9
            rows.append((f"{command} on {Path(data).name}: plan / measured peak anonymous GB (ratio), wall s",
                         f"{estimate / 1e9:.2f} / {peak / 1e9:.2f} ({estimate / peak:.2f}), {wall:.0f}"))  # fmt: skip
    report("Memory plans against measured peaks", rows)


if __name__ == "__main__":
    main()
