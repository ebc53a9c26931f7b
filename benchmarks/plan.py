"""Memory plans against measured peaks: every long command on its defaults, each as its own
process, the plan's estimate (the `plan:` line it logs before any work) next to the peak anonymous
memory the kernel reports for it (RssAnon of /proc/PID/status, polled every 20 ms: memory-mapped
responses and the page cache left out, as the plan leaves them out).

    python benchmarks/plan.py --data DATA [--data DATA ...] [--workdir /tmp/bench-plan]
                              [--model test_vit --layers 'blocks.[0-5]'] [--skip finetune ...]

Per dataset: extract (a random-init trunk), fit-head, fit-ridge, predict (the head's run, test
split) and finetune (the head's run, one epoch).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path

from _measure import measured
from _report import report

PLAN = re.compile(r"plan: \S+ peaks at ~([0-9.]+) GB")
STEPS = ("extract", "fit-head", "fit-ridge", "predict", "finetune")


def plan_and_peak(cmd: list[str], log: Path) -> tuple[float, float, float]:
    """(plan bytes, measured peak anonymous bytes, wall s) of one command."""
    env = os.environ | {"COLUMNS": "400", "HF_HUB_OFFLINE": "1"}  # the plan line unwrapped
    m = measured(cmd, env, log, poll_s=0.02)
    return float(PLAN.search(log.read_text()).group(1)) * 1e9, m["anon_gb"] * 1e9, m["wall"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, action="append", required=True)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench-plan")
    ap.add_argument("--model", default="test_vit")
    ap.add_argument("--layers", nargs="+", default=["blocks.[0-5]"])
    ap.add_argument("--skip", nargs="*", default=[], choices=STEPS)
    args = ap.parse_args()
    rows = []
    for data in args.data:
        work = args.workdir / data.name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cache, head = work / "cache", work / "head"
        d = ["--data", str(data)]
        trunk = ["--model", args.model, "--no-pretrained", *[x for layer in args.layers for x in ("--layers", layer)]]
        commands = {
            "extract": ["extract", str(data), "--out", str(cache), *trunk],
            "fit-head": ["fit-head", str(cache), *d, "--out", str(head)],
            "fit-ridge": ["fit-ridge", str(cache), *d, "--out", str(work / "ridge")],
            "predict": ["predict", str(head), *d, "--out", str(work / "pred")],
            "finetune": ["finetune", str(head), *d, "--out", str(work / "ft"), "--set", "epochs=1"],
        }
        for step in STEPS:
            if step in args.skip:
                continue
            estimate, peak, wall = plan_and_peak(["blobenc", *commands[step]], work / f"{step}.log")
            rows.append((f"{step} on {data.name}: plan / measured peak anonymous GB (ratio), wall s",
                         f"{estimate / 1e9:.2f} / {peak / 1e9:.2f} ({estimate / peak:.2f}), {wall:.0f}"))  # fmt: skip
            print(rows[-1], flush=True)
    report("Memory plans against measured peaks", rows)


if __name__ == "__main__":
    main()
