"""Group-PCA fit benchmark: wall time and peak memory against the size of the responses.

    python benchmarks/pca.py [--samples 4000] [--components 256] [--backend sklearn] [--baseline OLD_CHECKOUT]

Responses are random low-rank data in a 39548-vertex group space where a quarter of the
samples lack 700 vertices (as subjects 6 and 8 do), fitted as fit-head does (in place, with
two EM passes for the missing entries). Each fit runs in a child process; its memory is the
peak of the arrays it allocates beyond the responses and mask (tracemalloc, which numpy
reports to). `--baseline` also runs the blobenc of another checkout (e.g. a `git worktree`
of an older commit), for a before/after table from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _report import report

CHILD = """
import inspect, json, time, tracemalloc
import numpy as np
from blobenc.pca import GroupPCA
n, v, k, backend = {n}, {v}, {k}, {backend!r}
rng = np.random.default_rng(0)
basis = rng.standard_normal((64, v), dtype=np.float32)
Y = np.empty((n, v), dtype=np.float32)
for i in range(0, n, 256):  # by blocks, so generating the data leaves no peak of its own
    rows = min(256, n - i)
    Y[i : i + rows] = rng.standard_normal((rows, 64), dtype=np.float32) @ basis
    Y[i : i + rows] += rng.standard_normal((rows, v), dtype=np.float32)
mask = np.ones((n, v), dtype=bool)
mask[: n // 4, :700] = False
Y[: n // 4, :700] = 0
pca = GroupPCA(k, backend=backend)
in_place = "copy" in inspect.signature(pca.fit).parameters
tracemalloc.start()  # numpy reports its buffers to tracemalloc: the arrays the fit allocates
t0 = time.perf_counter()
pca.fit(Y, mask, copy=False) if in_place else pca.fit(Y, mask)
seconds = time.perf_counter() - t0
peak = tracemalloc.get_traced_memory()[1]
ratio = float(pca.explained_variance_ratio_.sum())
print(json.dumps({{"seconds": seconds, "peak": peak, "ratio": ratio}}))
"""


def run(args, checkout: Path) -> dict:
    """The fit in a child whose `import blobenc` finds this checkout's package (-c puts the cwd first)."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    code = CHILD.format(n=args.samples, v=args.vertices, k=args.components, backend=args.backend)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=checkout
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--vertices", type=int, default=39548)
    p.add_argument("--components", type=int, default=256)
    p.add_argument("--backend", default="sklearn")
    p.add_argument("--baseline", default=None, help="another checkout whose blobenc to compare with")
    args = p.parse_args(argv)
    data_mb = args.samples * args.vertices * 4 / 1e6
    runs = {"this checkout": run(args, Path(__file__).resolve().parents[1])}
    if args.baseline:
        runs[f"baseline {args.baseline}"] = run(args, Path(args.baseline).resolve())
    rows = [("responses (float32, MB)", f"{data_mb:.0f}")]
    for name, r in runs.items():
        grew = r["peak"] / 1e6
        rows += [
            (f"[bold]{name}", ""),
            ("fit incl. 2 EM passes (s)", f"{r['seconds']:.1f}"),
            ("peak of the arrays the fit allocates (MB, tracemalloc)", f"{grew:.0f}"),
            ("[bold]peak / responses", f"[bold]{grew / data_mb:.2f}x"),
            ("explained variance ratio", f"{r['ratio']:.4f}"),
        ]
    report(f"group PCA: {args.samples} x {args.vertices}, {args.components} components, {args.backend}", rows)


if __name__ == "__main__":
    main()
