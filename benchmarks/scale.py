"""Scale benchmark: the whole CLI pipeline at a given number of training images per subject, with
the CPU time each command spends in user and kernel (system) mode.

    python benchmarks/scale.py --workdir /tmp/scale --train-images 250 [--checkout COPY]
                               [--baseline CHECKOUT] [--baseline-env OMP_WAIT_POLICY=ACTIVE ...]
                               [--skip fit-ridge]

`blobenc synth` (8 subjects, `--vertices full --image-size 64`) writes the dataset once per
size; then, each as its own process with the kernel's accounting of it (wall, user, sys, peak
RSS, page faults, context switches; what `/usr/bin/time -v` reports), with `--profile` so every
run folder also holds its profile.json:
  * extract: vit_tiny_patch16_224, random init, layers blocks.[0369] and blocks.11;
  * fit-head with defaults; fit-ridge with defaults;
  * predict from the fit-head run (test split, scored).
`--baseline` runs the same commands with another checkout's blobenc (e.g. a `git worktree` of the
commit before a change), after this checkout's, on the same dataset: one table, both measured
in the same run. `--baseline-env KEY=VALUE` adds environment to the baseline's commands only.
`--checkout` runs "this" side from a copy too (a working tree others keep editing, frozen).
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

from _report import report

LAYERS = ["--layers", "blocks.[0369]", "--layers", "blocks.11"]
TRUNK = ["--model", "vit_tiny_patch16_224", "--no-pretrained"]
SYNTH = ["--vertices", "full", "--image-size", "64"]
STEPS = ("extract", "fit-head", "fit-ridge", "predict")


def blobenc(checkout: Path | None) -> list[str]:
    """The command line that runs `blobenc` from `checkout` (None: this environment's)."""
    code = "import sys; from blobenc.cli import main; sys.argv[0] = 'blobenc'; main()"
    return [sys.executable, "-c", code] if checkout else [shutil.which("blobenc") or "blobenc"]


def timed(cmd: list[str], env: dict, log: Path) -> dict:
    """Run one command; its wall time and the kernel's accounting of it (`os.wait4`: the same
    figures `/usr/bin/time -v` prints, without needing that program), output in `log`."""
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {
        "wall": wall,
        "user": ru.ru_utime,
        "sys": ru.ru_stime,
        "rss_gb": ru.ru_maxrss / 2**20,  # KiB on Linux
        "faults": ru.ru_minflt + ru.ru_majflt,
        "vcs": ru.ru_nvcsw,
        "ics": ru.ru_nivcsw,
    }


def pipeline(name: str, data: Path, work: Path, checkout: Path | None, extra_env: dict, skip: set) -> dict:
    """extract, fit-head, fit-ridge, predict into `work`; {step: measures}."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra_env)
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
    cli = blobenc(checkout)
    cache, head, ridge, pred = work / "cache", work / "head", work / "ridge", work / "pred"
    scored = ["--json", str(work / "predict.json")]
    commands = {
        "extract": [*cli, "extract", str(data), "--out", str(cache), *TRUNK, *LAYERS, "--quiet"],
        "fit-head": [*cli, "fit-head", str(cache), "--data", str(data), "--out", str(head), "--quiet"],
        "fit-ridge": [*cli, "fit-ridge", str(cache), "--data", str(data), "--out", str(ridge), "--quiet"],
        "predict": [*cli, "predict", str(head), "--data", str(data), "--out", str(pred), "--quiet", *scored],
    }
    results = {}
    for step in STEPS:
        if step in skip or (step == "predict" and "fit-head" in skip):
            continue
        cmd = commands[step]
        if checkout is None or _has_profile(checkout):
            cmd = [*cmd, "--profile"]
        print(f"[{name}] {step} ...", flush=True)
        results[step] = timed(cmd, env, work / f"{step}.log")
        print(f"[{name}] {step}: {json.dumps(results[step])}", flush=True)
    if "fit-head" in results:
        summary = json.loads((head / "summary.json").read_text())
        results["fit-head"]["score"] = summary["val"]["median_r2"]
    if "fit-ridge" in results:
        results["fit-ridge"]["score"] = json.loads((ridge / "summary.json").read_text())["val"]["median_r2"]
    if "predict" in results:
        results["predict"]["score"] = json.loads((work / "predict.json").read_text()).get("score")
    return results


def _has_profile(checkout: Path) -> bool:
    return (checkout / "blobenc" / "profile.py").is_file()


def rows_for(name: str, results: dict) -> list[tuple[str, str]]:
    rows = [(f"[bold]{name}", "wall s / user s / sys s / sys÷user / peak RSS GB / faults / score")]
    for step, r in results.items():
        ratio = r["sys"] / r["user"] if r["user"] else float("nan")
        score = f"{r['score']:.4f}" if isinstance(r.get("score"), float) else "-"
        rows.append(
            (
                step,
                f"{r['wall']:.1f} / {r['user']:.1f} / {r['sys']:.1f} / [bold]{ratio:.3f}[/] / {r['rss_gb']:.2f} / "
                f"{r['faults'] / 1e6:.2f}M / {score}",
            )
        )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--train-images", type=int, default=250, help="training images per subject")
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--test-images", type=int, default=40)
    p.add_argument("--checkout", type=Path, default=None, help="run this side from a copy (default: installed)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to run the same commands with")
    p.add_argument("--baseline-env", nargs="*", default=[], help="KEY=VALUE for the baseline's commands only")
    p.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    args = p.parse_args(argv)
    root = args.workdir / f"n{args.train_images}"
    data = root / "data"
    if not data.exists():
        sizes = ["--train-images", str(args.train_images), "--test-images", str(args.test_images)]
        subprocess.run(
            [*blobenc(None), "synth", str(data), "--subjects", str(args.subjects), *sizes, *SYNTH, "--quiet"],
            check=True,
        )
    from blobenc.data.base import open_dataset

    ds = open_dataset(data)
    n_images = len(ds.unique_images())
    this = args.checkout.resolve() if args.checkout else None
    runs = {"this checkout": pipeline("this checkout", data, root / "this", this, {}, set(args.skip))}
    if args.baseline:
        env = dict(kv.split("=", 1) for kv in args.baseline_env)
        label = f"baseline {args.baseline}" + (f" ({' '.join(args.baseline_env)})" if env else "")
        runs[label] = pipeline("baseline", data, root / "baseline", args.baseline.resolve(), env, set(args.skip))
    rows = [
        ("dataset", f"{args.subjects} subjects x {args.train_images} training images, {n_images} unique images"),
        ("cores available", str(len(os.sched_getaffinity(0)))),
        ("load average at the end", " ".join(f"{x:.1f}" for x in os.getloadavg())),
    ]
    for name, results in runs.items():
        rows += rows_for(name, results)
    (root / "scale.json").write_text(json.dumps(runs, indent=2) + "\n")
    report(f"scale: {args.train_images} training images per subject", rows)


if __name__ == "__main__":
    main()
