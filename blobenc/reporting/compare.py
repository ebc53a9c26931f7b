"""The report of a comparison folder (`blobenc report CMP`, docs/compare.md): the leaderboard,
model x relative depth heatmaps per ROI group, and fsaverage maps of each model's best layer's
depth, of the winning model and of the variance partition."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from blobenc.compare_tables import ALL, EVERY, vertex_maps
from blobenc.errors import ReportError
from blobenc.files import read_json
from blobenc.reporting import figures
from blobenc.reporting.page import _fmt, write_html
from blobenc.reporting.runs import HEMIS
from blobenc.reporting.scores import fsaverage_maps, open_data
from blobenc.reporting.surface import mean_maps


def is_comparison(path: Path) -> bool:
    return (Path(path) / "compare.json").is_file()


def _figure(fig, alt: str, dpi: int = 100) -> dict:
    uri, width, height = figures.to_png(fig, dpi)
    return {"uri": uri, "width": width, "height": height, "alt": alt}


def _csv(path: Path) -> list[dict]:
    import csv

    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v) if v != "" else None
            except ValueError:
                pass
    return rows


def write_compare_report(cmp: Path | str, out: Path | str, data: Path | str | None = None, title: str | None = None):
    """One HTML page of the comparison folder `cmp` (summary.json and the CSV tables written);
    maps need the dataset (`data`, default: the one compare.json recorded)."""
    import jinja2

    from blobenc import __version__

    cmp, out = Path(cmp), Path(out)
    if not (cmp / "summary.json").is_file():
        raise ReportError(f"{cmp}: the comparison is not finished (no summary.json); rerun blobenc compare to finish")
    header = read_json(cmp / "compare.json", ReportError)
    summary = read_json(cmp / "summary.json", ReportError)
    notes = []
    root = Path(data) if data is not None else Path(header["data"])
    dataset = open_data(root) if root.is_dir() else None
    if dataset is None:
        notes.append(f"the comparison's dataset {root} is not here: pass --data for maps")
    t0 = time.perf_counter()
    board = _csv(cmp / "leaderboard.csv")
    ctx = {
        "title": title or f"blobenc compare: {', '.join(c['label'] for c in header['caches'])}",
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "version": __version__,
        "data_root": str(root),
        "notes": notes,
        "caches": [
            {"label": c["label"], "model": c["model"], "layers": ", ".join(c["layers"]), "path": c["path"]}
            for c in header["caches"]
        ],
        "config": ", ".join(f"{k}={v}" for k, v in header["config"].items() if v is not None),
        "overall": [
            {
                "model": r["model"],
                "layer": r["layer"],
                "depth": "–" if r["depth"] is None else f"{r['depth']:.2f}",
                "val_r2": _fmt(r["val_r2"]),
                "val_r": _fmt(r["val_r"]),
                "test": _fmt(r["test_score"], 3),
            }
            for r in summary["overall"]
        ],
        "best_models": [
            {k: (_fmt(v) if isinstance(v, float) else ("–" if v is None else v)) for k, v in r.items()}
            for r in summary["best_models"]
            if (r["group"], r["roi"]) != EVERY
        ],
        "heatmaps": _heatmaps(board),
        "maps": _maps(cmp, dataset) if dataset is not None else {},
        "partition": _partition_rows(summary),
    }
    ctx["seconds"] = f"{time.perf_counter() - t0:.1f}"
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("blobenc.reporting", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return write_html(env.get_template("compare.html.j2").render(**ctx), out)


def _heatmaps(board: list[dict]) -> list[dict]:
    """One figure per ROI group: a model x depth heatmap of mean validation R² for each ROI."""
    groups: dict[str, dict[str, dict[str, list]]] = {}
    for r in board:
        if r["layer"] == ALL or r["depth"] is None:
            continue
        groups.setdefault(r["group"], {}).setdefault(r["roi"], {}).setdefault(r["model"], []).append(
            (r["depth"], r["val_r2"])
        )
    out = []
    for group, rois in groups.items():
        panels = [(roi if group != "all" else "every target", models) for roi, models in rois.items()]
        fig = figures.depth_heatmap_figure(panels, "validation R² minus the ROI's best")
        out.append({"group": group, "figure": _figure(fig, f"model x depth heatmap, {group}")})
    return out


def _maps(cmp: Path, dataset) -> dict:
    maps = vertex_maps(cmp)
    models = maps["models"]
    subjects = maps["subjects"]

    def mean_of(get) -> dict[str, np.ndarray] | None:
        per = fsaverage_maps(dataset, {s: get(e) for s, e in subjects.items()})
        return mean_maps(list(per.values())) if per else None

    out: dict = {"depth": [], "partition": []}
    for model in models:
        m = mean_of(lambda e, model=model: e["depth"][model])
        if m is None:
            return {"note": "the dataset's targets are not on an fsaverage surface: no maps"}
        label = f"{model}: relative depth of the best layer per vertex (mean over subjects)"
        fig = figures.surface_figure(m, label=label, cmap="plasma", vmin=0, vmax=1)
        out["depth"].append({"label": model, "figure": _figure(fig, label)})
    best = {m: mean_of(lambda e, m=m: e["best_r2"][m]) for m in models}
    winner = {}
    for hemi in HEMIS:
        stack = np.stack([best[m][hemi] for m in models])
        finite = np.isfinite(stack).any(0)
        winner[hemi] = np.where(finite, np.argmax(np.where(np.isfinite(stack), stack, -np.inf), 0), np.nan)
    label = "winning model per vertex (best layer's validation R², mean over subjects)"
    out["winner"] = _figure(figures.category_figure(winner, models, "winning model"), label)
    if maps["partition"]:
        a, b = (p["text"] for p in maps["partition"])
        parts = {"unique_a": f"unique to A ({a})", "unique_b": f"unique to B ({b})", "shared": "shared by A and B"}
        means = {k: mean_of(lambda e, k=k: e["partition"][k]) for k in parts}
        finite = np.concatenate([v[h][np.isfinite(v[h])] for v in means.values() for h in HEMIS])
        lim = float(np.percentile(np.abs(finite), 99)) if len(finite) else 1.0
        for key, text in parts.items():
            label = f"validation R² {text}, mean over subjects"
            fig = figures.surface_figure(means[key], label=label, cmap="RdBu_r", vmin=-(lim or 1), vmax=lim or 1)
            out["partition"].append({"label": text, "figure": _figure(fig, label)})
    return out


def _partition_rows(summary: dict) -> dict | None:
    p = summary.get("partition")
    if not p:
        return None
    keys = ("r2_a", "r2_b", "r2_ab", "unique_a", "unique_b", "shared")
    rows = []
    for r in p["rois"]:
        vals = [r.get(k) for k in keys]
        rows.append({"group": r["group"], "roi": r["roi"], "cells": [_fmt(v, 3) for v in vals]})
    scale = max((abs(v) for r in p["rois"] for k in keys if isinstance(v := r.get(k), float) and math.isfinite(v)),
                default=1)  # fmt: skip
    return {"a": p["a"], "b": p["b"], "rows": rows, "scale": scale}
