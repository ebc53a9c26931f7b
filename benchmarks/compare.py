"""compare benchmark: one `blobenc compare` against the separate fit-ridge runs of the same work
(docs/benchmarks.md, "compare: a model x layer leaderboard in one pass").

    python benchmarks/compare.py --workdir /tmp/bench-compare --train-images 250 [--subjects 2]
                                 [--vertices small|full] [--image-size 64] [--refit both|yes|no]
                                 [--trunks test_vit,test_resnet,test_convnext]

A synthetic Algonauts-layout dataset (a seed no test uses) and three random-init trunks of
different depth cached at every block (test_vit: 4 blocks, test_resnet: 4 stages, test_convnext:
4 stages); then, each as its own process (wall time, peak RSS from /usr/bin/time):
  * `blobenc compare` of the 3 caches, every layer and each cache's layers together;
  * the same work as separate runs: per cache, `fit-ridge --layers L` for every layer and one
    `fit-ridge` of all its layers, with fit-ridge's defaults (refit on every training image, the
    model predict uses) and with --no-refit (validation only, what compare computes).
Prints a JSON summary: seconds, peak RSS, fits, seconds per layer-fit (one subject, one feature set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _measure import timed

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRUNKS = {"test_vit": "blocks.*", "test_resnet": "layer*", "test_convnext": "stages.*"}
BLOBENC = [sys.executable, "-m", "blobenc"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--train-images", type=int, default=250)
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--vertices", default="small")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--skip-separate", action="store_true", help="only compare (and its report)")
    ap.add_argument("--trunks", default=",".join(TRUNKS), help="comma-separated subset of the three trunks")
    ap.add_argument("--refit", default="both", choices=["both", "yes", "no"], help="which fit-ridge runs to time")
    args = ap.parse_args()
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    data = w / "data"
    if not data.exists():
        subprocess.run([*BLOBENC, "synth", str(data), "--subjects", str(args.subjects), "--train-images",
                        str(args.train_images), "--test-images", "40", "--vertices", args.vertices,
                        "--image-size", str(args.image_size), "--seed", "24", "-q"], check=True)  # fmt: skip
    caches = []
    for model in args.trunks.split(","):
        layers = TRUNKS[model]
        cache = w / model
        if not cache.exists():
            subprocess.run([*BLOBENC, "extract", str(data), "--out", str(cache), "--model", model, "--no-pretrained",
                            "--layers", layers, "--device", "cpu", "-q"], check=True)  # fmt: skip
        caches.append(cache)
    from blobenc.features.cache import FeatureCache

    layers = {c.name: FeatureCache.open(c).layers for c in caches}
    out: dict = {"train_images": args.train_images, "subjects": args.subjects, "vertices": args.vertices}
    out["layers"] = layers
    cmp, plain = w / "cmp", w / "cmp-no-partition"
    n_sets = sum(len(v) + 1 for v in layers.values())
    out["compare_fits"] = n_sets * args.subjects
    shutil.rmtree(plain, ignore_errors=True)
    cmd = [*BLOBENC, "compare", *map(str, caches), "--data", str(data), "--out", str(plain), "-q"]
    out["compare_no_partition_s"], out["compare_no_partition_rss_mb"] = timed(cmd)
    out["compare_no_partition_s_per_fit"] = out["compare_no_partition_s"] / out["compare_fits"]
    if len(caches) >= 2:  # the variance partition of the first two trunks, and the report
        shutil.rmtree(cmp, ignore_errors=True)
        cmd = [*cmd[:-3], "--out", str(cmp), "-q", "--partition", caches[0].name, "--partition", caches[1].name]
        out["compare_s"], out["compare_rss_mb"] = timed(cmd)
        t0 = time.perf_counter()
        subprocess.run([*BLOBENC, "report", str(cmp), "--out", str(w / "cmp.html"), "-q"], check=True)
        out["report_s"] = time.perf_counter() - t0
    print(json.dumps(out), flush=True)
    if not args.skip_separate:
        for refit in {"both": (True, False), "yes": (True,), "no": (False,)}[args.refit]:
            total, peak, runs = 0.0, 0.0, 0
            for cache in caches:
                for sel in [["--layers", n] for n in layers[cache.name]] + [[]]:
                    run = w / "ridge"
                    shutil.rmtree(run, ignore_errors=True)
                    extra = [] if refit else ["--no-refit"]
                    s, rss = timed([*BLOBENC, "fit-ridge", str(cache), "--data", str(data), "--out", str(run), "-q",
                                    *sel, *extra])  # fmt: skip
                    total, peak, runs = total + s, max(peak, rss), runs + 1
            key = "fit_ridge" if refit else "fit_ridge_no_refit"
            out[f"{key}_s"], out[f"{key}_rss_mb"], out[f"{key}_runs"] = total, peak, runs
            out[f"{key}_s_per_fit"] = total / (runs * args.subjects)
            print(json.dumps(out), flush=True)
        for key in ("fit_ridge", "fit_ridge_no_refit"):
            if f"{key}_s" in out:
                out[f"speedup_vs_{key}"] = out[f"{key}_s"] / out["compare_no_partition_s"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
