"""Scale benchmark: the whole CLI pipeline at a given number of training images per subject, each
command on its defaults as its own process, measured as the kernel sees it.

    python benchmarks/scale.py --workdir /tmp/scale --train-images 9841 --test-images 159
                               [--model test_vit --layers 'blocks.[0-5]'] [--skip fit-ridge ...]
                               [--head-set epochs=3 ...]
                               [--checkout COPY] [--baseline CHECKOUT [--baseline-env K=V ...]]

`blobenc synth` (8 subjects, `--vertices full --image-size 64`: the real vertex counts) writes the
dataset once per size, itself measured; then extract (a random-init timm trunk, default the tiny
`test_vit`, all six blocks cached), fit-ridge, fit-head (full schedule unless `--head-set
epochs=N`), predict (the head's run, test split, scored), evaluate (those predictions) and
report (both runs, one HTML page). For each:
wall, user and system CPU seconds, sys÷user, peak anonymous memory (what the kernel cannot
reclaim: memory-mapped inputs and the page cache left out; issue #21's budget), peak RSS, page
faults and bytes written; and, from the `--profile` each command writes, the seconds of its
top-level phases. The projection of these phases to the seed's EVA02-base trunk is in
docs/benchmarks.md, from the cache's bytes and the trunk's FLOPs.
`--baseline` runs the same commands with another checkout's blobenc (e.g. a `git worktree` of the
commit before a change), after this checkout's, on the same dataset: one table, both measured in
the same run. `--baseline-env KEY=VALUE` adds environment to the baseline's commands only.
`--checkout` runs "this" side from a copy too (a working tree others keep editing, frozen).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from _measure import du, measured
from _report import report

SYNTH = ["--vertices", "full", "--image-size", "64"]
STEPS = ("extract", "fit-ridge", "fit-head", "predict", "evaluate", "report")


def blobenc(checkout: Path | None) -> list[str]:
    """The command line that runs `blobenc` from `checkout` (None: this environment's)."""
    # the checkout first on the path: `python -c` puts the current folder there, which from a working
    # tree would import its blobenc instead of the checkout's
    first = f"import sys; sys.path.insert(0, {str(checkout)!r}); "
    code = first + "from blobenc.cli import main; sys.argv[0] = 'blobenc'; main()"
    return [sys.executable, "-c", code] if checkout else [shutil.which("blobenc") or "blobenc"]


def phases(folder: Path) -> dict[str, float]:
    """Wall seconds of the top-level phases in folder/profile.json (empty when there is none)."""
    path = folder / "profile.json"
    if not path.is_file():
        return {}
    found = json.loads(path.read_text())["phases"]
    return {name: p["wall_s"] for name, p in found.items() if "/" not in name}


def pipeline(name: str, data: Path, work: Path, checkout: Path | None, extra_env: dict, args) -> dict:
    """extract ... report into `work`; {step: measures}."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", **extra_env)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    cli = blobenc(checkout)
    cache, head, ridge, pred = work / "cache", work / "head", work / "ridge", work / "pred"
    page = work / "report.html"
    trunk = ["--model", args.model, "--no-pretrained", *[x for layer in args.layers for x in ("--layers", layer)]]
    d = ["--data", str(data), "--quiet"]
    head_set = [x for kv in args.head_set for x in ("--set", kv)]
    commands = {  # step: (command, what it writes, where its profile.json goes)
        "extract": ([*cli, "extract", str(data), "--out", str(cache), *trunk, "--quiet"], cache, cache),
        "fit-ridge": ([*cli, "fit-ridge", str(cache), *d, "--out", str(ridge)], ridge, ridge),
        "fit-head": ([*cli, "fit-head", str(cache), *d, "--out", str(head), *head_set], head, head),
        "predict": ([*cli, "predict", str(head), *d, "--out", str(pred), "--json", str(work / "predict.json")],
                    pred, pred),
        "evaluate": ([*cli, "evaluate", str(pred), *d, "--json", str(work / "evaluate.json")], None, None),
        "report": ([*cli, "report", str(head), str(ridge), *d, "--out", str(page)], page, None),
    }  # fmt: skip
    results = {}
    for step in STEPS:
        if step in args.skip:
            continue
        cmd, written, profiled = commands[step]
        if profiled is not None and (checkout is None or (checkout / "blobenc" / "profile.py").is_file()):
            cmd = [*cmd, "--profile"]
        print(f"[{name}] {step} ...", flush=True)
        results[step] = measured(cmd, env, work / f"{step}.log")
        results[step]["written_gb"] = du(written) / 1e9 if written is not None and written.exists() else 0.0
        results[step]["phases"] = phases(profiled) if profiled is not None else {}
        print(f"[{name}] {step}: {json.dumps(results[step])}", flush=True)
    for step, path in (("fit-head", head / "summary.json"), ("fit-ridge", ridge / "summary.json")):
        if step in results:
            results[step]["score"] = json.loads(path.read_text())["val"]["median_r2"]
    for step in ("predict", "evaluate"):
        if step in results:
            results[step]["score"] = json.loads((work / f"{step}.json").read_text()).get("score")
    return results


def rows_for(name: str, results: dict) -> list[tuple[str, str]]:
    head = "wall s / user s / sys s / sys÷user / peak anon GB / peak RSS GB / faults / written GB / score"
    rows = [(f"[bold]{name}", head)]
    for step, r in results.items():
        ratio = r["sys"] / r["user"] if r["user"] else float("nan")
        score = f"{r['score']:.4f}" if isinstance(r.get("score"), float) else "-"
        rows.append(
            (
                step,
                f"{r['wall']:.1f} / {r['user']:.1f} / {r['sys']:.1f} / [bold]{ratio:.3f}[/] / "
                f"[bold]{r['anon_gb']:.2f}[/] / {r['rss_gb']:.2f} / {r['faults'] / 1e6:.2f}M / "
                f"{r['written_gb']:.2f} / {score}",
            )
        )
        if r.get("phases"):
            rows.append(("  phases (wall s)", ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--train-images", type=int, default=250, help="training images per subject")
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--test-images", type=int, default=40)
    p.add_argument("--model", default="test_vit", help="a timm model, random init")
    p.add_argument("--layers", nargs="+", default=["blocks.[0-5]"])
    p.add_argument("--checkout", type=Path, default=None, help="run this side from a copy (default: installed)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to run the same commands with")
    p.add_argument("--baseline-env", nargs="*", default=[], help="KEY=VALUE for the baseline's commands only")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    p.add_argument("--head-set", nargs="*", default=[], help="KEY=VALUE for fit-head (e.g. epochs=3)")
    args = p.parse_args(argv)
    root = args.workdir / f"n{args.train_images}"
    data = root / "data"
    runs = {}
    if not data.exists():
        root.mkdir(parents=True, exist_ok=True)
        sizes = ["--train-images", str(args.train_images), "--test-images", str(args.test_images)]
        cmd = [*blobenc(None), "synth", str(data), "--subjects", str(args.subjects), *sizes, *SYNTH, "--quiet"]
        print("synth ...", flush=True)
        synth = measured(cmd, dict(os.environ), root / "synth.log")
        runs["dataset"] = {"synth": synth | {"written_gb": du(data) / 1e9, "phases": {}}}
    from blobenc.data import open_dataset

    n_images = len(open_dataset(data).unique_images())
    this = args.checkout.resolve() if args.checkout else None
    runs["this checkout"] = pipeline("this checkout", data, root / "this", this, {}, args)
    if args.baseline:
        env = dict(kv.split("=", 1) for kv in args.baseline_env)
        label = f"baseline {args.baseline}" + (f" ({' '.join(args.baseline_env)})" if env else "")
        runs[label] = pipeline("baseline", data, root / "baseline", args.baseline.resolve(), env, args)
    rows = [
        ("dataset", f"{args.subjects} subjects x {args.train_images} training images, {n_images} unique images"),
        ("trunk", f"{args.model} (random init), layers {' '.join(args.layers)}"),
        ("cores available", str(len(os.sched_getaffinity(0)))),
        ("load average at the end", " ".join(f"{x:.1f}" for x in os.getloadavg())),
    ]
    for name, results in runs.items():
        rows += rows_for(name, results)
    (root / "scale.json").write_text(json.dumps(runs, indent=2) + "\n")
    report(f"scale: {args.train_images} training images per subject", rows)


if __name__ == "__main__":
    main()
