"""fit-ridge benchmark: one run, one table on one cache (docs/benchmarks.md records the figures).

    python benchmarks/ridge.py --workdir /tmp/bench-ridge [--train-images 240] [--with-fit-head]
                               [--scale-images 2000]

A synthetic Algonauts-layout dataset (8 subjects, the real vertex counts, a seed no test uses) and a
random-init vit_tiny cache of 5 layers; then, each as its own process (wall time and peak RSS from
/usr/bin/time), with test scores by the devkit formula (`predict` + `evaluate`):
  * fit-ridge with defaults (mean features) and with --features tokens;
  * the plain baseline: per subject scikit-learn RidgeCV(alpha_per_target=True) (leave-one-out
    alpha per vertex) on the z-scored, concatenated mean-pooled tokens of the same cache;
  * fit-head with defaults (--with-fit-head; slow);
  * seconds per subject of fit-ridge at --scale-images training images for one subject.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from _measure import timed
from _report import report

LAYERS = ["--layers", "blocks.[0369]", "--layers", "blocks.11"]


def dataset(work: Path, name: str, subjects: int, images: int, seed: int) -> tuple[Path, Path]:
    data, cache = work / name / "data", work / name / "cache"
    if not data.exists():
        subprocess.run(
            ["blobenc", "synth", str(data), "--subjects", str(subjects), "--train-images", str(images),
             "--test-images", "100", "--vertices", "full", "--image-size", "64", "--seed", str(seed), "-q"],
            check=True,
        )  # fmt: skip
    if not cache.exists():
        subprocess.run(
            ["blobenc", "extract", str(data), "--model", "vit_tiny_patch16_224", "--no-pretrained", *LAYERS,
             "--out", str(cache), "--quiet"],
            check=True,
        )  # fmt: skip
    return data, cache


def test_score(run: Path, data: Path, out: Path) -> float:
    subprocess.run(["blobenc", "predict", str(run), "--data", str(data), "--out", str(out), "-q"], check=True)
    subprocess.run(
        ["blobenc", "evaluate", str(out), "--data", str(data), "--json", str(out / "scores.json"), "--no-rois"],
        check=True,
        capture_output=True,
    )
    return json.loads((out / "scores.json").read_text())["score"]


def sklearn_baseline(cache: Path, data: Path, out: Path) -> None:
    """Per subject: z-scored mean-pooled tokens of every layer, RidgeCV with LOO alpha per vertex,
    fitted on every training image, predicting the test images in the subject's vertex order."""
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    from blobenc.data import open_dataset
    from blobenc.features.cache import FeatureCache

    c = FeatureCache.open(cache)
    ds = open_dataset(data)
    prefix = c.attrs["num_prefix_tokens"]
    feats = np.concatenate([c.array(n)[:][:, prefix:].astype(np.float32).mean(1) for n in c.layers], 1)
    for name, subject in ds.subjects.items():
        train = feats[c.rows(list(subject.keys["train"]))]
        test = feats[c.rows(list(subject.keys["test"]))]
        scaler = StandardScaler().fit(train)
        y = np.asarray(subject.responses("train"))
        model = RidgeCV(alphas=np.logspace(-1, 6, 22), alpha_per_target=True).fit(scaler.transform(train), y)
        ds.write_predictions(out, name, model.predict(scaler.transform(test)).astype(np.float32), "test")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--train-images", type=int, default=240)
    ap.add_argument("--with-fit-head", action="store_true")
    ap.add_argument("--scale-images", type=int, default=0, help="fit-ridge seconds per subject at this size")
    ap.add_argument("--baseline", nargs=3, metavar=("CACHE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline:
        sklearn_baseline(*map(Path, args.baseline))
        return
    work = args.workdir
    data, cache = dataset(work, f"n{args.train_images}", 8, args.train_images, 11)
    rows, scores = [], {}
    for label, extra in (("fit-ridge (defaults: mean)", []), ("fit-ridge --features tokens", ["--features", "tokens"])):
        run = work / f"run-{len(rows)}"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        wall, rss = timed(["blobenc", "fit-ridge", str(cache), "--data", str(data), "--out", str(run), "-q", *extra])
        val = json.loads((run / "summary.json").read_text())["val"]
        scores[label] = test_score(run, data, work / f"pred-{len(rows)}")
        rows.append((label, wall, rss, val["median_r2"], scores[label]))
    pred = work / "pred-sklearn"
    wall, rss = timed(
        [sys.executable, __file__, "--workdir", str(work), "--baseline", str(cache), str(data), str(pred)]
    )
    subprocess.run(
        ["blobenc", "evaluate", str(pred), "--data", str(data), "--json", str(pred / "scores.json"), "--no-rois"],
        check=True,
        capture_output=True,
    )
    scores["sklearn"] = json.loads((pred / "scores.json").read_text())["score"]
    rows.append(("sklearn RidgeCV LOO, mean tokens (plain baseline)", wall, rss, float("nan"), scores["sklearn"]))
    if args.with_fit_head:
        run = work / "run-head"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        wall, rss = timed(["blobenc", "fit-head", str(cache), "--data", str(data), "--out", str(run), "-q"])
        val = json.loads((run / "summary.json").read_text())["val"]
        rows.append(("fit-head (defaults)", wall, rss, val["median_r2"], test_score(run, data, work / "pred-head")))
    table = [
        (f"{label}: wall s / peak RSS MB / val median R² / test score", f"{w:.1f} / {m:.0f} / {v:.4f} / {s:.2f}")
        for label, w, m, v, s in rows
    ]
    table.append(("fit-ridge defaults − plain baseline (test score points)", f"{rows[0][4] - scores['sklearn']:+.2f}"))
    if args.scale_images:
        data2, cache2 = dataset(work, f"scale{args.scale_images}", 1, args.scale_images, 12)
        run = work / "run-scale"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        wall, rss = timed(["blobenc", "fit-ridge", str(cache2), "--data", str(data2), "--out", str(run), "-q"])
        per = json.loads((run / "summary.json").read_text())["subjects"][0]
        table.append(
            (f"fit-ridge at {args.scale_images} training images, 1 subject: process wall s / subject s / RSS MB",
             f"{wall:.1f} / {per['seconds']:.1f} / {rss:.0f}")
        )  # fmt: skip
    report(f"fit-ridge, 8 subjects x {args.train_images} training images, real vertex counts, vit_tiny 5 layers", table)


if __name__ == "__main__":
    main()
