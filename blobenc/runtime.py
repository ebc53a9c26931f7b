"""Device, precision and CPU choices shared by every command that runs a model.

CPU resources are sized here, in one place, from the cores this process may actually use
(`available_cores`: its affinity mask and cgroup quota, not the machine's core count): torch's
intra-op threads, DataLoader workers, and how glibc's allocator keeps freed memory
(`configure_cpu`). docs/benchmarks.md ("Where the CPU time goes") has the measurements.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import math
import os
from pathlib import Path

import torch

from blobenc.errors import ConfigError

logger = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# blocks from this size up are mapped on their own during a one-off phase (`large_blocks_mapped`)
ONE_OFF_BLOCK = 32 << 20
# Settings a user may have chosen for the allocator themselves: then blobenc leaves it alone.
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
_state: dict = {}


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cpusets, SLURM, torchrun's
    binding), capped by a cgroup v2 CPU quota (`docker --cpus`), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, quota)
    return max(1, n)


def _cgroup_quota() -> int | None:
    """cores allowed by /sys/fs/cgroup/cpu.max ('max 100000' or 'QUOTA PERIOD'), rounded up; None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def default_threads() -> int:
    """torch intra-op threads: BLOBENC_THREADS, else OMP_NUM_THREADS, else one per available core."""
    for var in ("BLOBENC_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise ConfigError(f"{var}={value!r}: expected a number of threads") from None
    return available_cores()


def default_workers(device: torch.device | str | None = None) -> int:
    """DataLoader worker processes for image decoding (`device` None: CUDA when present).

    On the CPU the trunk and the decoder share the same cores: a worker process only takes
    cycles from the forward pass (and copies every batch through shared memory), so images are
    decoded in the main process (0 workers) unless at least 4 cores are available, then one
    worker per 4 cores, at most 8. On a GPU the cores are free for decoding: all but one, at most 8.
    """
    cores = available_cores()
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda:
        return max(0, min(8, cores - 1))
    return min(8, cores // 4)


def configure_cpu(threads: int | None = None) -> dict:
    """Size the process for the cores it has; what every `blobenc` command does first.

    - torch's intra-op threads: `threads`, else `default_threads()` (never more than the cores
      available unless asked: oversubscribed OpenMP threads spin on each other);
    - glibc malloc: freed memory kept for reuse instead of returned to the kernel (no mmap for
      large blocks, no trimming). Training allocates and frees the same large activations every
      step; by default each one is a fresh mmap whose pages fault in, zeroed, on first touch and
      are unmapped on free: measured at a third of the process's CPU time as system time. Left
      alone when the user set MALLOC_* / GLIBC_TUNABLES, preloads another allocator, or sets
      BLOBENC_MALLOC=default. The heap then keeps every phase's high-water mark: a command calls
      `release_memory()` where a phase's large temporaries are gone (fit-head at the full NSD
      size reached 23 GB after its group PCA where 8 GB were live, #21).
    Returns what was set (also kept for `runtime_info`)."""
    n = threads if threads is not None else default_threads()
    if n < 1:
        raise ConfigError(f"threads={n}: expected at least 1")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _state.update(threads=n, cores=available_cores(), malloc=_keep_freed_memory())
    return dict(_state)


def _keep_freed_memory() -> str:
    if "malloc" in _state:
        return _state["malloc"]
    if os.environ.get("BLOBENC_MALLOC", "").strip().lower() == "default":
        return "default (BLOBENC_MALLOC)"
    if any(v in os.environ for v in _MALLOC_ENV):
        return "user settings (MALLOC_* / GLIBC_TUNABLES)"
    if any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return "preloaded allocator"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return "default (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # M_MMAP_MAX 0: large blocks come from the heap; M_TRIM_THRESHOLD -1: the heap is never trimmed
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    return "keep freed memory (mmap_max=0, trim_threshold=-1)" if ok else "default (mallopt refused)"


def release_memory() -> None:
    """Give the heap's free pages back to the kernel (glibc `malloc_trim`, every arena, holes
    included): where a phase's large temporaries were freed and what follows is smaller or of
    other sizes. A no-op unless `configure_cpu` set the heap to keep freed memory."""
    if not _state.get("malloc", "").startswith("keep freed memory"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    libc.malloc_trim(0)


@contextlib.contextmanager
def large_blocks_mapped(threshold: int = ONE_OFF_BLOCK):
    """Inside: blocks of `threshold` bytes and more get their own mapping, returned to the kernel
    when freed, as glibc does by default; outside, the heap keeps freed memory again. For a
    one-off phase of large transient arrays (fit-head's group PCA: its targets, Gram matrix,
    eigensolver workspace), whose frees would otherwise leave holes in the heap that later
    blocks of other sizes fit badly: the same PCA peaked between 12.7 and 15.6 GB from run to
    run at the full NSD size where ~11.5 GB were live (#21). Training steps stay on the heap:
    mapping their per-step activations anew cost as much system time as user time.
    A no-op unless `configure_cpu` set the heap to keep freed memory."""
    if not _state.get("malloc", "").startswith("keep freed memory"):
        yield
        return
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, threshold) != 1:  # glibc refuses thresholds above 32 MiB
        yield
        return
    mallopt(_M_MMAP_MAX, 1 << 16)
    try:
        yield
    finally:
        mallopt(_M_MMAP_MAX, 0)  # blocks mapped inside are still unmapped when freed later
        release_memory()


def runtime_info() -> dict:
    """Threads, cores and allocator settings in effect: recorded in profile.json."""
    return {
        "cores_available": available_cores(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc": _state.get("malloc", "default"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when present (the LOCAL_RANK GPU under torchrun), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            import os

            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected 'auto', 'cpu' or 'cuda[:N]'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: CUDA is not available on this machine")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for fp32. 'auto': bf16 on GPUs that support it, fp32 on CPU
    (bf16/fp16 autocast on CPU measured 5-100x slower than fp32)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision not in _PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: expected one of auto, {', '.join(_PRECISIONS)}")
    return _PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
