"""Group-PCA fit benchmark: time, memory and agreement of the PCA backends at fit-head's scale.

    python benchmarks/pca.py [--samples 4000] [--components 256] [--backend sklearn] [--baseline OLD_CHECKOUT]
    python benchmarks/pca.py --compare [--samples 7200 --components 2048]   # torch vs scikit-learn

Responses are random data in a 39548-vertex group space with a decaying spectrum (a signal of
rank 2 x components whose component variances fall as 1/i, plus isotropic noise, so that every
fitted component is signal) where a quarter of the
samples lack 700 vertices (as subjects 6 and 8 do), fitted as fit-head does (in place, with
two EM passes for the missing entries). Each fit runs in a child process; its memory is the
peak of the arrays it allocates beyond the responses and mask (tracemalloc, which numpy
reports to; torch's allocations are not seen there, so the child's peak RSS is given too).
`--baseline` also runs the blobenc of another checkout (e.g. a `git worktree` of an older
commit), for a before/after table from one run. `--compare` fits the same data with the torch
and scikit-learn backends and compares them: explained variance, and the principal angles
between the subspaces their leading components span.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _report import report

CHILD = """
import inspect, json, resource, time, tracemalloc
import numpy as np
from blobenc.pca import GroupPCA
try:
    from blobenc.runtime import configure_cpu
    configure_cpu()  # what every blobenc command does first
except ImportError:  # an older checkout
    pass
n, v, k, backend, save = {n}, {v}, {k}, {backend!r}, {save!r}
rng = np.random.default_rng(0)
rank = 2 * k
basis = rng.standard_normal((rank, v), dtype=np.float32) / np.sqrt(v)
scale = np.sqrt(2e5 / np.arange(1, rank + 1)).astype(np.float32)  # variances 2e5 / i: above the noise
Y = np.empty((n, v), dtype=np.float32)
for i in range(0, n, 256):  # by blocks, so generating the data leaves no peak of its own
    rows = min(256, n - i)
    Y[i : i + rows] = (rng.standard_normal((rows, rank), dtype=np.float32) * scale) @ basis
    Y[i : i + rows] += rng.standard_normal((rows, v), dtype=np.float32)
mask = np.ones((n, v), dtype=bool)
mask[: n // 4, :700] = False
Y[: n // 4, :700] = 0
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
pca = GroupPCA(k, backend=backend)
in_place = "copy" in inspect.signature(pca.fit).parameters
tracemalloc.start()  # numpy reports its buffers to tracemalloc: the arrays the fit allocates
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
pca.fit(Y, mask, copy=False) if in_place else pca.fit(Y, mask)
seconds = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
peak = tracemalloc.get_traced_memory()[1]
if save:
    np.savez(save, components=pca.components_, explained_variance=pca.explained_variance_,
             ratio=pca.explained_variance_ratio_, mean=pca.mean_)
print(json.dumps({{
    "seconds": seconds, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
    "peak": peak, "rss_growth": r1.ru_maxrss * 1024 - rss0, "ratio": float(pca.explained_variance_ratio_.sum()),
    "solver": getattr(pca, "solver_", backend),
}}))
"""


def run(args, checkout: Path, backend: str, save: str | None = None) -> dict:
    """The fit in a child whose `import blobenc` finds this checkout's package (-c puts the cwd first)."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the blobenc command sets it
    code = CHILD.format(n=args.samples, v=args.vertices, k=args.components, backend=backend, save=save)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=checkout
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def timing_rows(name: str, r: dict, data_mb: float) -> list[tuple[str, str]]:
    return [
        (f"[bold]{name}", r.get("solver", "")),
        ("fit incl. 2 EM passes: wall / user / sys (s)", f"{r['seconds']:.1f} / {r['user']:.1f} / {r['sys']:.1f}"),
        ("peak of the numpy arrays the fit allocates (MB)", f"{r['peak'] / 1e6:.0f}"),
        ("peak RSS growth during the fit (MB)", f"{r['rss_growth'] / 1e6:.0f}"),
        ("explained variance ratio (sum)", f"{r['ratio']:.5f}"),
    ]


def compare(a: dict, b: dict) -> list[tuple[str, str]]:
    """Agreement of two fits: explained variance (the larger, the closer to the exact PCA: its
    leading subspace captures the most variance) and principal angles between the subspaces of
    the leading quarter of the components (below where a continuous spectrum leaves the last
    components ill-determined) and of all of them."""
    ratio = (a["ratio"].sum() - b["ratio"].sum()) / b["ratio"].sum()
    ev = np.abs(a["explained_variance"] - b["explained_variance"]) / b["explained_variance"]
    m = max(1, len(ev) // 4)
    # cosines of the principal angles = singular values of A B^T (orthonormal rows)
    cos = np.linalg.svd(a["components"][:m] @ b["components"][:m].T, compute_uv=False)
    angle = np.degrees(np.arccos(np.clip(cos.min(), -1, 1)))
    cos_all = np.linalg.svd(a["components"] @ b["components"].T, compute_uv=False)
    return [
        ("[bold]torch vs scikit-learn", ""),
        ("explained variance ratio (sum): (torch - sklearn) / sklearn", f"{ratio:+.2e}"),
        (f"explained variance, leading {m} components: max relative difference", f"{ev[:m].max():.2e}"),
        ("explained variance, all components: median relative difference", f"{np.median(ev):.2e}"),
        (f"largest principal angle, leading {m} components (degrees)", f"{angle:.3f}"),
        ("mean cos² of the principal angles, all components", f"{np.mean(cos_all**2):.4f}"),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--vertices", type=int, default=39548)
    p.add_argument("--components", type=int, default=256)
    p.add_argument("--backend", default="sklearn")
    p.add_argument("--baseline", default=None, help="another checkout whose blobenc to compare with")
    p.add_argument("--compare", action="store_true", help="torch and scikit-learn backends on the same data")
    args = p.parse_args(argv)
    data_mb = args.samples * args.vertices * 4 / 1e6
    here = Path(__file__).resolve().parents[1]
    rows = [("responses (float32, MB)", f"{data_mb:.0f}")]
    if args.compare:
        with tempfile.TemporaryDirectory() as tmp:
            fits, saved = {}, {}
            for backend in ("torch", "sklearn"):
                saved[backend] = f"{tmp}/{backend}.npz"
                fits[backend] = run(args, here, backend, saved[backend])
                rows += timing_rows(f"backend {backend}", fits[backend], data_mb)
            loaded = {b: dict(np.load(f)) for b, f in saved.items()}
            rows += compare(loaded["torch"], loaded["sklearn"])
            rows.append(
                ("[bold]time sklearn / torch", f"[bold]{fits['sklearn']['seconds'] / fits['torch']['seconds']:.2f}x")
            )
        report(f"group PCA: {args.samples} x {args.vertices}, {args.components} components, torch vs sklearn", rows)
        return
    runs = {"this checkout": run(args, here, args.backend)}
    if args.baseline:
        runs[f"baseline {args.baseline}"] = run(args, Path(args.baseline).resolve(), args.backend)
    for name, r in runs.items():
        rows += timing_rows(name, r, data_mb)
        rows.append(("[bold]peak / responses", f"[bold]{r['peak'] / 1e6 / data_mb:.2f}x"))
    report(f"group PCA: {args.samples} x {args.vertices}, {args.components} components, {args.backend}", rows)


if __name__ == "__main__":
    main()
