"""Memory plans: what a long command holds at its peak, estimated from the data's shapes, logged and
checked against `--max-memory` before any work. Runs that die of memory after an hour, once the
cache is built, are what this prevents.

A plan is what stays resident for the whole command (the interpreter and its libraries, features
held in memory) plus the largest of its phases (fit-head: the group PCA, then training), and the
bytes it will write, checked against the disk's free space before any work too.
benchmarks/plan.py compares the estimates with measured peaks (docs/benchmarks.md)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from blobenc.errors import ConfigError, ResourceError

# Anonymous memory of a command before its data: Python with torch, timm, zarr, scikit-learn and
# himalaya imported and torch's CPU allocator warmed up (measured by benchmarks/plan.py).
BASELINE = 400 << 20


def available_memory() -> int:
    """Bytes a new allocation can take without swapping (the kernel's MemAvailable), divided
    among the torchrun processes on this machine, which plan at the same time."""
    from blobenc.distributed import local_world_size  # torch: not when the Python API is imported

    return _mem_available() // local_world_size()


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_bytes(text: str | None, option: str = "--max-memory") -> int | None:
    """'512M', '8G', '1.5T' or a plain number of bytes."""
    if text is None:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected a size such as 512M or 8G") from None


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@dataclass
class MemoryPlan:
    command: str
    resident: dict[str, int]  # held for the whole command
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # the largest one adds to the peak
    disk: int = 0  # bytes the command will write

    @property
    def peak_phase(self) -> str | None:
        return max(self.phases, key=lambda p: sum(self.phases[p].values())) if self.phases else None

    @property
    def peak(self) -> int:
        phase = self.peak_phase
        return sum(self.resident.values()) + (sum(self.phases[phase].values()) if phase else 0)

    def without(self, part: str) -> int:
        """The peak without one resident part (what is left of a budget for it is budget - this)."""
        return self.peak - self.resident.get(part, 0)

    def describe(self) -> str:
        parts = [f"{k} {gb(v)}" for k, v in self.resident.items() if v]
        phase = self.peak_phase
        if phase:
            parts.append(f"{phase}: " + " + ".join(f"{k} {gb(v)}" for k, v in self.phases[phase].items() if v))
        writes = f"; writes ~{gb(self.disk)}" if self.disk else ""
        return f"plan: {self.command} peaks at ~{gb(self.peak)} ({'; '.join(parts)}){writes}"

    def check(self, budget: int, remedy: str) -> None:
        """Refuse in one line, naming what would fit, when the peak exceeds `budget`."""
        if self.peak > budget:
            raise ResourceError(
                f"--max-memory {gb(budget)}: {self.command} needs ~{gb(self.peak)} at its peak "
                f"({self.peak_phase or 'throughout'}); {remedy}"
            )

    def check_disk(self, out: Path, remedy: str) -> None:
        """Refuse in one line when the disk holding `out` has less free space than the plan writes."""
        if not self.disk:
            return
        existing = next(p for p in (out, *out.parents) if p.exists())
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise ResourceError(f"{out}: Read-only file system; write elsewhere")
        free = shutil.disk_usage(existing).free
        if self.disk > free:
            raise ResourceError(
                f"{out}: {self.command} writes ~{gb(self.disk)}, the disk has {gb(free)} free; {remedy}"
            )
