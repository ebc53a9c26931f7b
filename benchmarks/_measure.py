"""Run one command as its own process and measure it as the kernel sees it: wall time, user and
system CPU time, page faults (`os.wait4`, what `/usr/bin/time -v` reports), peak RSS, and the
peak *anonymous* memory (RssAnon of /proc/PID/status, polled): what the kernel cannot reclaim,
memory-mapped inputs and the page cache left out. Issue #21's budget is on the latter."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def rss_anon(pid: int) -> int:
    """RssAnon of `pid` in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def measured(cmd: list[str], env: dict, log: Path, poll_s: float = 0.05) -> dict:
    """Run `cmd` (output to `log`), which must succeed; its measures."""
    peak_anon = 0
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env)
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_anon = max(peak_anon, rss_anon(proc.pid))
            time.sleep(poll_s)
        wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {
        "wall": wall,
        "user": ru.ru_utime,
        "sys": ru.ru_stime,
        "anon_gb": peak_anon / 1e9,
        "rss_gb": ru.ru_maxrss * 1024 / 1e9,  # KiB on Linux
        "faults": ru.ru_minflt + ru.ru_majflt,
    }


def du(path: Path) -> int:
    """Bytes on disk under `path` (a file or a folder)."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command, which must succeed."""
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0, int(res.stderr.strip().splitlines()[-1]) / 1024
