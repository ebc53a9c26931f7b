"""Where a command's time goes: wall, user and system CPU time, page faults and context switches
(`resource.getrusage`), in total and per phase (read, forward, backward, optimizer, validation...).

    with profiling() as prof:        # what `--profile` / BLOBENC_PROFILE=1 wraps a command in
        fit_head(...)
    prof.write(run / "profile.json")

Library code marks its phases with the module-level `phase(name)`, which costs a global lookup
when no profiler is active. Nested phases are named by their path ("train/forward"). A phase's
CPU times and faults are the whole process's (every thread) while it was open: torch's intra-op
threads work inside the phase that launched them, and a background reader's work lands in
whatever phase the main thread is in. Phases are recorded from the thread that opened the
profiler only. On CUDA the device is synchronized when a phase closes so that its wall time is
the work's, not the launch's (profiling slows a GPU run slightly for that reason).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

ENV = "BLOBENC_PROFILE"
F = TypeVar("F", bound=Callable)
T = TypeVar("T")
_FIELDS = ("user_s", "sys_s", "minor_faults", "major_faults", "voluntary_switches", "involuntary_switches")


def env_enabled() -> bool:
    """BLOBENC_PROFILE is set to something other than '', '0', 'false' or 'no'."""
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no")


def _usage(who: int = resource.RUSAGE_SELF) -> tuple[float, ...]:
    r = resource.getrusage(who)
    return (r.ru_utime, r.ru_stime, r.ru_minflt, r.ru_majflt, r.ru_nvcsw, r.ru_nivcsw)


def _peak_rss_bytes(who: int) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # kilobytes on Linux


@dataclass
class PhaseStats:
    calls: int = 0
    wall_s: float = 0.0
    usage: list[float] = field(default_factory=lambda: [0.0] * len(_FIELDS))

    def to_dict(self) -> dict:
        out: dict = {"calls": self.calls, "wall_s": round(self.wall_s, 6)}
        for name, v in zip(_FIELDS, self.usage, strict=True):
            out[name] = round(v, 6) if name.endswith("_s") else int(v)
        return out


class Profiler:
    """Totals of one run and its phases. Use through `profiling()`; `phase(name)` opens a phase."""

    def __init__(self) -> None:
        self.phases: dict[str, PhaseStats] = {}
        self._stack: list[str] = []
        self._thread = threading.get_ident()
        self._sync = None
        self.start()

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._u0 = _usage()
        self._c0 = _usage(resource.RUSAGE_CHILDREN)
        self.total: dict | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if threading.get_ident() != self._thread:  # a background thread: its work shows in the totals
            yield
            return
        path = "/".join([*self._stack, name])
        self._stack.append(name)
        t0, u0 = time.perf_counter(), _usage()
        try:
            yield
        finally:
            self._synchronize()
            t1, u1 = time.perf_counter(), _usage()
            self._stack.pop()
            stats = self.phases.setdefault(path, PhaseStats())
            stats.calls += 1
            stats.wall_s += t1 - t0
            stats.usage = [a + (b - c) for a, b, c in zip(stats.usage, u1, u0, strict=True)]

    def _synchronize(self) -> None:
        if self._sync is None:
            import sys

            torch = sys.modules.get("torch")  # never import torch just to profile
            cuda = getattr(torch, "cuda", None)
            self._sync = cuda.synchronize if cuda is not None and cuda.is_initialized() else False
        if self._sync:
            self._sync()

    def stop(self) -> dict:
        """The totals since start: this process and its finished child processes (DataLoader workers)."""
        wall = time.perf_counter() - self._t0
        own = [b - a for a, b in zip(self._u0, _usage(), strict=True)]
        children = [b - a for a, b in zip(self._c0, _usage(resource.RUSAGE_CHILDREN), strict=True)]
        total = {"wall_s": round(wall, 6)}
        for name, a, b in zip(_FIELDS, own, children, strict=True):
            both = a + b
            total[name] = round(both, 6) if name.endswith("_s") else int(both)
        total["children_user_s"] = round(children[0], 6)
        total["children_sys_s"] = round(children[1], 6)
        total["sys_over_user"] = round(total["sys_s"] / total["user_s"], 4) if total["user_s"] > 0 else None
        total["cpu_over_wall"] = round((total["user_s"] + total["sys_s"]) / wall, 4) if wall > 0 else None
        total["peak_rss_bytes"] = _peak_rss_bytes(resource.RUSAGE_SELF)
        total["children_peak_rss_bytes"] = _peak_rss_bytes(resource.RUSAGE_CHILDREN)
        self.total = total
        return total

    def to_dict(self) -> dict:
        from blobenc.runtime import runtime_info

        return {
            "format": "blobenc.profile",
            "version": "1",
            "total": self.total if self.total is not None else self.stop(),
            "phases": {name: s.to_dict() for name, s in self.phases.items()},
            "runtime": runtime_info(),
        }

    def write(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


_active: Profiler | None = None
_NULL = contextlib.nullcontext()


def phase(name: str) -> contextlib.AbstractContextManager:
    """A phase of the active profiler; a shared no-op context when none is active."""
    prof = _active
    return _NULL if prof is None else prof.phase(name)


def timed(name: str) -> Callable[[F], F]:
    """Decorator: every call of the function is a phase `name` of the active profiler."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if _active is None:
                return fn(*args, **kwargs)
            with _active.phase(name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def timed_iter(name: str, items: Iterable[T]) -> Iterator[T]:
    """`items`, with the time spent producing each one (a loader's next()) counted as phase `name`."""
    it = iter(items)
    while True:
        with phase(name):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def active() -> Profiler | None:
    return _active


@contextlib.contextmanager
def profiling(enabled: bool = True) -> Iterator[Profiler | None]:
    """Profile the enclosed work (None and nothing recorded when not `enabled`); totals are taken on exit."""
    global _active
    if not enabled:
        yield None
        return
    previous, prof = _active, Profiler()
    _active = prof
    try:
        yield prof
    finally:
        _active = previous
        prof.stop()
