"""Pipeline check: the whole CLI, tiny and seeded, on both dataset layouts, recording every number
it produces, so that two checkouts (before and after a refactor) can be shown to agree bit for bit.

    python benchmarks/pipeline.py --checkout DIR --workdir W --out scores.json [--layouts algonauts generic]
                                  [--threads 1]
    python benchmarks/pipeline.py --compare A.json B.json

Run mode: each command is its own process, running the `blobenc` found in DIR (PYTHONPATH=DIR, as
`--checkout` in benchmarks/scale.py), on the CPU with a fixed number of threads (default 1), from
W/<layout> with relative paths (so no absolute path reaches any output). Per layout:
  synth (3 subjects x 60 training images, 20 test images, 64 px, seed 0)
  -> extract (timm's `test_vit`, random init, blocks 1, 3, 5)
  -> fit-ridge -> fit-head (3 epochs)
  -> fit-head sweep (lr 1e-3 and 3e-3, 4 epochs, --halving; random init: from the default
     closed-form start no epoch of this tiny data validates better, and the race would be between
     two copies of the start)
  -> fit-head --ensemble 2 (3 epochs)
  -> finetune (of fit-head's run: 1 epoch, batch 16, no DataLoader workers)
  -> predict of each run (head, sweep, ensemble, ridge, finetune)
  -> predict head ridge --select stack
  -> evaluate of each predictions folder
  -> report (head, ridge, finetune; only that it runs).
About 2 minutes per layout on 2 cores.

scores.json: `results[layout][step]` is a flat {key: value} of
- `json:<file>:<key path>` (`[i]`: a list's item, or a .jsonl file's line): every scalar of the
  JSON each command writes (its --json, and summary.json, sweep.json, ensemble.json, run.json,
  split.json, metrics.jsonl, selection.json in its output folder), except timings (seconds,
  samples/s, bytes written) and paths; a list longer than 16 items is one SHA-256 of its JSON;
- `sha256:<relative path>`: every .npy and .safetensors file the step wrote. For .safetensors the
  hash is of the file's bytes except the timing fields of its metadata (state.safetensors records
  each epoch's seconds); the tensors' names, dtypes, shapes and bytes all count;
- synth: the dataset's files (one digest for all images, one hash per other file); extract: each
  cached layer's decoded array and the image order.
`headline[layout][step]` is the one score to read (fit-*: validation median R² from
summary.json; predict/evaluate: the test score of their --json); `timing` the wall seconds;
`meta` the checkout, its commit, versions and environment. Only `results` is compared.

Compare mode prints every key of `results` that differs (A, B, |A - B|) and the largest |A - B|,
or "identical". Floats are equal only when bit-equal (JSON keeps a float's every bit).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _measure import measured
from _report import report

LAYOUTS = ("algonauts", "generic")
SYNTH = ["--subjects", "3", "--train-images", "60", "--test-images", "20", "--image-size", "64", "--seed", "0"]
TRUNK = ["--model", "test_vit", "--no-pretrained", "--layers", "blocks.[135]", "--seed", "0"]
CPU = ["--device", "cpu"]
RUNS = ("head", "sweep", "ensemble", "ridge", "finetune")  # predicted one by one, in this order
STACK = ("head", "ridge")  # predict RUN_A RUN_B --select stack
VOLATILE = {"seconds", "samples_per_s", "images_per_s", "bytes_written", "wall_s"}  # timings
PATHS = {"cache", "data", "path", "dir", "command", "from"}  # where things were, not what they hold
RUN_JSON = ("summary.json", "sweep.json", "ensemble.json", "run.json", "split.json", "selection.json")
IMAGES = {".png", ".jpg", ".jpeg"}
MARKER = ".pipeline-check"  # a layout folder holding this may be deleted by a rerun


# -- hashing and flattening ---------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scrub(obj):
    """`obj` without timing keys (recursively); JSON strings inside are parsed first."""
    if isinstance(obj, str) and obj[:1] in "[{":
        try:
            obj = json.loads(obj)
        except ValueError:
            return obj
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def sha256_safetensors(path: Path) -> str:
    """The file's SHA-256 but for the timing fields of its metadata: header (metadata scrubbed,
    canonical JSON), then the tensors' bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = {k: scrub(v) for k, v in header["__metadata__"].items()}
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    h.update(memoryview(raw)[8 + n :])
    return h.hexdigest()


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def leaves(obj, prefix: str) -> dict:
    """Flat {key path: scalar} of a JSON value, without timings and paths; long lists hashed."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in VOLATILE and k not in PATHS:
                out |= leaves(v, f"{prefix}{k}" if prefix.endswith(":") else f"{prefix}.{k}")
    elif isinstance(obj, list) and len(obj) > 16:
        out[f"{prefix}#sha256"] = digest(obj)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out |= leaves(v, f"{prefix}[{i}]")
    else:
        out[prefix] = obj
    return out


def json_scores(path: Path, name: str) -> dict:
    """leaves() of a .json file, or of each line of a .jsonl one ([i] the line)."""
    if path.suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return leaves(lines, f"json:{name}:") if len(lines) <= 16 else {f"json:{name}:#sha256": digest(lines)}
    return leaves(json.loads(path.read_text()), f"json:{name}:")


def folder_scores(folder: Path) -> dict:
    """The JSON scores and the .npy/.safetensors hashes of a run or predictions folder."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.name in RUN_JSON or path.suffix == ".jsonl":
            out |= json_scores(path, rel)
        elif path.suffix == ".npy":
            out[f"sha256:{rel}"] = sha256_file(path)
        elif path.suffix == ".safetensors":
            out[f"sha256:{rel}"] = sha256_safetensors(path)
    return out


def dataset_scores(data: Path) -> dict:
    """One hash per file of the dataset, but one digest for all its images (there are hundreds)."""
    out, images = {}, hashlib.sha256()
    files = sorted(p for p in data.rglob("*") if p.is_file())
    for path in files:
        rel = path.relative_to(data).as_posix()
        if path.suffix.lower() in IMAGES:
            images.update(f"{rel}\0{sha256_file(path)}\n".encode())
        else:
            out[f"sha256:{rel}"] = sha256_file(path)
    out["files"] = len(files)
    out["sha256:<images>"] = images.hexdigest()
    return out


def cache_scores(cache: Path) -> dict:
    """Each cached layer as decoded (not its chunk files: a change of chunking alone is no change),
    and the cache's image order."""
    import numpy as np
    import zarr

    group = zarr.open_group(str(cache), mode="r")
    out = {"images#sha256": digest(list(group.attrs["images"]))}
    for name, array in sorted(group.arrays()):
        if not name.startswith("_"):
            values = np.ascontiguousarray(array[...])
            h = hashlib.sha256(f"{values.dtype.str} {values.shape}".encode())
            h.update(values.tobytes())
            out[f"sha256:{name}"] = h.hexdigest()
    return out


# -- running ------------------------------------------------------------------------------------


def environment(checkout: Path, threads: int) -> dict:
    """Every command's environment: the checkout first on the path, offline, CPU only, pinned threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("BLOBENC_PROFILE", "PYTHONPATH")}
    n = str(threads)
    env |= {
        "PYTHONPATH": str(checkout),
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "BLOBENC_THREADS": n,
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "PYTHONHASHSEED": "0",
        "COLUMNS": "200",
    }
    return env


def blobenc() -> list[str]:
    """`blobenc` from PYTHONPATH's checkout (as blobenc() in scale.py)."""
    return [sys.executable, "-c", "import sys; from blobenc.cli import main; sys.argv[0] = 'blobenc'; main()"]


def commands(layout: str) -> list[tuple[str, list[str], str | None]]:
    """(step, arguments, the folder it writes) in order, all relative to W/<layout>."""
    steps = [
        ("synth", ["synth", "data", *SYNTH, "--layout", layout], "data"),
        ("extract", ["extract", "data", "--out", "cache", *TRUNK, "--workers", "0", "--batch-size", "16", *CPU,
                     "--json", "json/extract.json"], "cache"),
        ("fit-ridge", ["fit-ridge", "cache", "--data", "data", "--out", "ridge", *CPU], "ridge"),
        ("fit-head", ["fit-head", "cache", "--data", "data", "--out", "head", "--set", "epochs=3", *CPU], "head"),
        ("fit-head-sweep", ["fit-head", "cache", "--data", "data", "--out", "sweep", "--set", "epochs=4",
                            "--set", "init=random", "--sweep", "lr=1e-3,3e-3", "--halving", *CPU], "sweep"),
        ("fit-head-ensemble", ["fit-head", "cache", "--data", "data", "--out", "ensemble", "--set", "epochs=3",
                               "--ensemble", "2", *CPU], "ensemble"),
        ("finetune", ["finetune", "head", "--data", "data", "--out", "finetune", "--set", "epochs=1",
                      "--set", "batch_size=16", "--set", "num_workers=0", *CPU], "finetune"),
    ]  # fmt: skip
    preds = [(run, [run]) for run in RUNS] + [("stack", [*STACK, "--select", "stack"])]
    for name, runs in preds:
        args = ["predict", *runs, "--data", "data", "--out", f"pred/{name}", "--json", f"json/predict-{name}.json"]
        steps.append((f"predict-{name}", [*args, *CPU], f"pred/{name}"))
    for name, _ in preds:
        steps.append((f"evaluate-{name}", ["evaluate", f"pred/{name}", "--data", "data",
                                           "--json", f"json/evaluate-{name}.json"], None))  # fmt: skip
    steps.append(("report", ["report", "head", "ridge", "finetune", "--data", "data", "--out", "report.html"], None))
    return steps


def run_layout(layout: str, root: Path, env: dict) -> tuple[dict, dict, dict]:
    """All steps in `root` (deleted first if a previous run made it); (results, headline, timing)."""
    if root.exists():
        if not (root / MARKER).is_file():
            sys.exit(f"{root} exists and was not made by this script: remove it or choose another --workdir")
        shutil.rmtree(root)
    (root / "logs").mkdir(parents=True)
    (root / "json").mkdir()
    (root / MARKER).write_text("made by benchmarks/pipeline.py; deleted by its next run here\n")
    results, headline, timing = {}, {}, {}
    cwd = Path.cwd()
    os.chdir(root)  # every path relative: outputs do not depend on the workdir
    try:
        for step, args, writes in commands(layout):
            print(f"[{layout}] {step} ...", flush=True)
            timing[step] = measured([*blobenc(), *args, "--quiet"], env, root / "logs" / f"{step}.log")["wall"]
            results[step] = scores = step_scores(step, Path(writes) if writes else None)
            headline[step] = headline_score(step, scores)
    finally:
        os.chdir(cwd)
    return results, headline, timing


def step_scores(step: str, writes: Path | None) -> dict:
    scores = {}
    if step == "synth":
        scores = dataset_scores(writes)
    elif step == "extract":
        scores = cache_scores(writes)
    elif writes is not None:
        scores = folder_scores(writes)
    path = Path("json") / f"{step}.json"  # the command's --json
    if path.is_file():
        scores |= json_scores(path, path.name)
    return scores


def headline_score(step: str, scores: dict) -> float | None:
    key = (
        "json:summary.json:val.median_r2"
        if step.startswith("fit-") or step == "finetune"
        else f"json:{step}.json:score"
    )
    return scores.get(key)


def checkout_meta(checkout: Path, env: dict, cwd: Path) -> dict:
    """Which blobenc the commands import from `cwd` (it must be the checkout's: `python -c` puts
    the working folder first on the path, so that from /work/main would import /work/main's),
    its commit, versions."""
    code = (
        "import json, platform, blobenc, numpy, torch, timm; print(json.dumps({'blobenc': blobenc.__file__, "
        "'python': platform.python_version(), 'numpy': numpy.__version__, 'torch': torch.__version__, "
        "'timm': timm.__version__, 'torch_threads': torch.get_num_threads()}))"
    )
    found = json.loads(
        subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, check=True).stdout
    )
    if not Path(found["blobenc"]).resolve().is_relative_to(checkout):
        sys.exit(f"the commands would import {found['blobenc']}, not the checkout {checkout}")

    def git(*args: str) -> str | None:
        done = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(checkout), *args], capture_output=True, text=True
        )
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no", "--", "blobenc")
    return found | {"checkout": str(checkout), "commit": git("rev-parse", "HEAD"), "blobenc_modified": bool(status)}


def run(args) -> None:
    checkout = args.checkout.resolve()
    if not (checkout / "blobenc" / "__init__.py").is_file():
        sys.exit(f"{checkout} holds no blobenc package")
    env = environment(checkout, args.threads)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    meta = checkout_meta(checkout, env, workdir) | {"threads": args.threads, "layouts": args.layouts}
    out = {"meta": meta, "headline": {}, "timing": {}, "results": {}}
    start = time.perf_counter()
    for layout in args.layouts:
        results, headline, timing = run_layout(layout, workdir / layout, env)
        out["results"][layout], out["headline"][layout], out["timing"][layout] = results, headline, timing
    out["meta"]["wall_s"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    rows = [
        ("checkout", f"{checkout} ({(meta['commit'] or '?')[:10]}{', modified' if meta['blobenc_modified'] else ''})")
    ]
    for layout in args.layouts:
        rows.append((f"[bold]{layout}", "score / wall s"))
        for step, score in out["headline"][layout].items():
            shown = f"{score:.6f}" if isinstance(score, float) else "-"
            rows.append((step, f"{shown} / {out['timing'][layout][step]:.1f}"))
    rows.append(("keys recorded", str(sum(len(s) for r in out["results"].values() for s in r.values()))))
    rows.append(("total wall s", f"{out['meta']['wall_s']:.0f}"))
    rows.append(("written", str(args.out)))
    report("pipeline check", rows)


# -- comparing ----------------------------------------------------------------------------------


def flat_results(path: Path) -> dict:
    found = json.loads(path.read_text())["results"]
    return {
        f"{layout}/{step}/{k}": v for layout, steps in found.items() for step, s in steps.items() for k, v in s.items()
    }


def same(a, b) -> bool:
    """Equal, floats bit for bit (NaN equals NaN, 0.0 differs from -0.0)."""
    if isinstance(a, float) and isinstance(b, float):
        return a.hex() == b.hex() or (math.isnan(a) and math.isnan(b))
    return type(a) is type(b) and a == b


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def compare(path_a: Path, path_b: Path) -> bool:
    """Print the differing keys; True when there are none."""
    from rich.console import Console
    from rich.table import Table

    a, b = flat_results(path_a), flat_results(path_b)
    meta_a, meta_b = (json.loads(p.read_text())["meta"] for p in (path_a, path_b))
    for key in ("threads", "python", "numpy", "torch", "timm"):  # what changes numbers besides the code
        if meta_a.get(key) != meta_b.get(key):
            print(f"warning: {key} differs ({meta_a.get(key)} vs {meta_b.get(key)}): numbers may differ for that alone")
    missing = object()
    differ = [k for k in sorted(a.keys() | b.keys()) if not same(a.get(k, missing), b.get(k, missing))]
    diffs = [abs(a[k] - b[k]) for k in differ if number(a.get(k)) and number(b.get(k))]
    console = Console(width=200)
    print(f"A: {path_a}\nB: {path_b}\nkeys: {len(a)} in A, {len(b)} in B")
    if not differ:
        print("identical")
        return True
    table = Table(title=f"{len(differ)} of {len(a.keys() | b.keys())} keys differ")
    for column in ("key", "A", "B", "|A - B|"):
        table.add_column(column, justify="left" if column == "key" else "right", overflow="fold")

    def shown(v) -> str:
        if v is missing:
            return "(absent)"
        return repr(v)[:20] if isinstance(v, str) and len(v) == 64 else repr(v)  # a hash: its start

    for k in differ:
        va, vb = a.get(k, missing), b.get(k, missing)
        diff = f"{abs(va - vb):.3g}" if number(va) and number(vb) else "-"
        table.add_row(k, shown(va), shown(vb), diff)
    console.print(table)
    steps = sorted({"/".join(k.split("/", 2)[:2]) for k in differ})  # layout/step (keys hold paths)
    print(f"steps with differences: {', '.join(steps)}")
    print(f"max |A - B| over numbers: {max(diffs):.3g}" if diffs else "no numeric differences (hashes/strings only)")
    return False


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", type=Path, help="the folder whose blobenc/ runs (a git worktree, say)")
    p.add_argument("--workdir", type=Path, help="where the runs go (W/<layout>/, replaced by a rerun)")
    p.add_argument("--out", type=Path, help="the scores JSON to write")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    p.add_argument("--threads", type=int, default=1, help="torch/BLAS threads of every command")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two scores JSON files")
    args = p.parse_args(argv)
    if args.compare:
        sys.exit(0 if compare(*args.compare) else 1)
    if not (args.checkout and args.workdir and args.out):
        p.error("--checkout, --workdir and --out are required (or --compare A B)")
    run(args)


if __name__ == "__main__":
    main()
