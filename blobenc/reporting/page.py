"""Assemble the report page: decide what each section shows, draw the figures, fill the template."""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from blobenc.files import atomic_path
from blobenc.reporting import figures
from blobenc.reporting.runs import HEMIS, Run
from blobenc.reporting.scores import fsaverage_maps, layer_preference, noise_ceiling_maps, vertex_scores
from blobenc.reporting.surface import mean_maps

logger = logging.getLogger(__name__)

# what a per-vertex metric is called and how it is drawn
METRICS = {
    "score": {"label": "test noise-normalized accuracy (%)", "cmap": "inferno", "floor": 0.0},
    "r": {"label": "test Pearson r", "cmap": "inferno", "floor": 0.0},
    "val_r": {"label": "validation Pearson r", "cmap": "inferno", "floor": 0.0},
}
# the config keys a run's card shows (the head's sizes are on their own row, as built)
CONFIG_KEYS = {
    "fit-head": ("epochs", "batch_size", "lr", "weight_decay", "dropout", "warmup_fraction", "seed"),
    "finetune": ("epochs", "batch_size", "lr", "weight_decay", "min_lr_fraction", "crop_scale", "unfreeze", "freeze"),
}
HIDDEN_KEYS = ("device", "precision")


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def _duration(seconds) -> str:
    if not isinstance(seconds, int | float):
        return "–"
    m, s = divmod(float(seconds), 60)
    h, m = divmod(m, 60)
    return f"{int(h)} h {int(m)} min" if h else (f"{int(m)} min {s:.0f} s" if m else f"{s:.1f} s")


def _config_value(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, list | tuple) else str(v)


def _test_headline(test: dict | None) -> str:
    if not test:
        return "–"
    if test["metric"] == "score":
        return f"{test['mean']:.2f} % (noise-normalized)"
    return f"r = {test['mean']:.3f}"


class Page:
    """The report's context for the template, figures drawn as they are added."""

    def __init__(self, runs: list[Run], dataset, data_root: str | None, subject_maps: bool = True):
        self.runs, self.dataset, self.data_root = runs, dataset, data_root
        self.subject_maps = subject_maps
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}

    def figure(self, fig, alt: str, dpi: int = 100) -> dict:
        uri, width, height = figures.to_png(fig, dpi)
        return {"uri": uri, "width": width, "height": height, "alt": alt}

    # -- header ---------------------------------------------------------------------------------------

    def about(self, run: Run) -> dict:
        spec = run.spec
        rows = [("kind", run.kind), ("folder", str(run.path))]
        if spec is not None:
            feats, trunk = spec.features, spec.features.trunk
            weights = "pretrained" if trunk.get("pretrained") else "random init"
            if trunk.get("weights"):
                weights = f"weights {trunk['weights']}"
            rows.append(("trunk", f"{feats.model} ({weights})"))
            rows.append(("layers", ", ".join(spec.layers)))
            kw = spec.kwargs or {}
            if spec.head:
                dims = ", ".join(f"{k} {kw[k]}" for k in ("hidden_dim", "proj_dim", "n_vertices") if k in kw)
                rows.append(("head", spec.head + (f" ({dims})" if dims else "")))
            if feats.pool:
                rows.append(("token pooling", str(feats.pool)))
        tuned_from = run.info.get("from") or (spec.finetune or {}).get("from") if spec else run.info.get("from")
        if tuned_from:
            rows.append(("fine-tuned from", tuned_from))
        if spec is not None and spec.imported:
            rows.append(("imported from", spec.imported.get("checkpoint", "?")))
        rows.append(("dataset", run.data_path or "not recorded"))
        if run.info.get("pca_components"):
            ev = run.info.get("pca_explained_variance")
            explained = f", {100 * ev:.1f}% of the variance" if ev else ""
            rows.append(("group PCA", f"{run.info['pca_components']} components{explained}"))
        configs = run.info.get("configs") or []
        best = run.best_trial
        cfg = (best.config if best else None) or (configs[0] if configs else None)
        swept = sorted({k for c in configs for k in c if any(c2.get(k) != c.get(k) for c2 in configs)})
        if cfg:
            shown = CONFIG_KEYS.get(run.kind) or [k for k, v in cfg.items() if v is not None and k not in HIDDEN_KEYS]
            keys = [k for k in shown if k in cfg] + [k for k in swept if k not in shown]
            rows.append(("config", ", ".join(f"{k}={_config_value(cfg[k])}" for k in keys)))
        if len(configs) > 1:
            over = ", ".join(swept) or "?"
            rows.append(("sweep", f"{len(configs)} trials over {over}; best {best.name if best else '?'}"))
        s = run.summary or {}
        if "seconds" in s:
            speed = f", {s['samples_per_s']:.0f} samples/s" if isinstance(s.get("samples_per_s"), int | float) else ""
            rows.append(("wall time", _duration(s["seconds"]) + speed))
        if run.command:
            rows.append(("command", run.command))
        return {"rows": rows, "notes": run.notes, "incomplete": run.incomplete}

    def overview(self) -> dict:
        rows = []
        for run in self.runs:
            val = run.val or {}
            best = run.best_trial
            epoch = (run.summary or {}).get("best_epoch")
            n_epochs = len(best.metrics) if best else 0
            rows.append(
                {
                    "label": run.label,
                    "kind": run.kind,
                    "status": "incomplete" if run.incomplete else "complete",
                    "best": (best.name if best and len(run.trials) > 1 else ""),
                    "epoch": f"{epoch + 1} of {n_epochs}" if isinstance(epoch, int) and n_epochs else "–",
                    "median_r2": _fmt(val.get("median_r2")),
                    "mean_r": _fmt(val.get("mean_r")),
                    "test": _test_headline(run.test),
                    "seconds": _duration((run.summary or {}).get("seconds")),
                }
            )
        return {"rows": rows}

    # -- curves ---------------------------------------------------------------------------------------

    def curves(self) -> list[dict]:
        limits = {}
        for key, get in (
            ("train_loss", lambda m: m.get("train_loss")),
            ("median_r2", lambda m: (m.get("val") or {}).get("median_r2")),
            ("mean_r", lambda m: (m.get("val") or {}).get("mean_r")),
        ):
            vals = [get(m) for r in self.runs for t in r.trials for m in t.metrics]
            vals = [v for v in vals if isinstance(v, int | float) and math.isfinite(v)]
            if vals:
                lo, hi = min(vals), max(vals)
                pad = 0.06 * (hi - lo or abs(hi) or 1)
                limits[key] = (lo - pad, hi + pad)
        out = []
        for run in self.runs:
            item = {"label": run.label, "figure": None, "ridge": None, "note": None}
            if any(t.metrics for t in run.trials):
                trials = [(t.name, t.metrics, t.best) for t in run.trials if t.metrics]
                item["figure"] = self.figure(figures.curves_figure(trials, limits), f"training curves of {run.label}")
            elif run.ridge_rows:
                item["ridge"] = [
                    {
                        "subject": r.get("subject"),
                        "solver": r.get("solver", "–"),
                        "features": r.get("features", "–"),
                        "alpha": _fmt(r.get("alpha_median"), 3),
                        "median_r2": _fmt((r.get("val") or {}).get("median_r2")),
                        "mean_r": _fmt((r.get("val") or {}).get("mean_r")),
                        "seconds": _duration(r.get("seconds")),
                    }
                    for r in run.ridge_rows
                ]
            else:
                item["note"] = "no metrics.jsonl: nothing recorded per epoch"
            out.append(item)
        return out

    # -- tables ---------------------------------------------------------------------------------------

    def subjects_table(self) -> dict:
        names = sorted(
            {s for r in self.runs for s in ((r.val or {}).get("subjects") or {})}
            | {s for r in self.runs if r.test for s in r.test["subjects"]}
        )
        columns = []  # (run label, column title, getter)
        for run in self.runs:
            val = (run.val or {}).get("subjects") or {}
            if val:
                columns.append((run, "val median R²", lambda n, v=val: (v.get(n) or {}).get("median_r2")))
                columns.append((run, "val mean r", lambda n, v=val: (v.get(n) or {}).get("mean_r")))
            if run.test and run.test["metric"] == "score":
                t = run.test["subjects"]
                columns.append((run, "test score (%)", lambda n, t=t: (t.get(n) or {}).get("score")))
                columns.append((run, "score, nc>0 (%)", lambda n, t=t: (t.get(n) or {}).get("score_nonzero_nc")))
                columns.append((run, "test median r", lambda n, t=t: (t.get(n) or {}).get("median_r")))
            elif run.test:
                t = run.test["subjects"]
                columns.append((run, "test mean r", lambda n, t=t: (t.get(n) or {}).get("mean_r")))
                columns.append((run, "test median r", lambda n, t=t: (t.get(n) or {}).get("median_r")))
        rows = [{"name": n, "cells": [_fmt(get(n)) for _, _, get in columns]} for n in names]
        means = []
        for _, _, get in columns:
            vals = [get(n) for n in names if isinstance(get(n), int | float)]
            means.append(_fmt(float(np.mean(vals))) if vals else "–")
        groups = []
        for run in self.runs:
            span = sum(1 for r, _, _ in columns if r is run)
            if span:
                groups.append({"label": run.label, "span": span})
        return {"groups": groups, "titles": [c[1] for c in columns], "rows": rows, "mean": means}

    def roi_table(self) -> dict | None:
        """Per ROI and hemisphere: each run's value with a bar; with several runs, which wins."""
        tables = []
        for run in self.runs:
            if run.test:
                tables.append((run, run.test["rois"], run.test["short"]))
            elif run.val_rois:
                tables.append((run, run.val_rois, "val R²"))
        if not tables:
            return None
        metrics = {m for _, _, m in tables}
        comparable = len(metrics) == 1 and len(tables) > 1
        found = {p for _, rois, _ in tables for e in rois.values() for hs in e.values() for p in hs}
        parts = [p for p in (*HEMIS, "all") if p in found]
        keys = []
        for _, rois, _ in tables:
            for group, entries in rois.items():
                for roi in entries:
                    if (group, roi) not in keys:
                        keys.append((group, roi))
        values = [v for _, rois, _ in tables for e in rois.values() for hs in e.values() for v in hs.values()]
        scale = max((abs(v) for v in values if isinstance(v, int | float) and math.isfinite(v)), default=1) or 1
        rows, wins = [], {run.label: 0 for run, _, _ in tables} | {"tie": 0}
        for group, roi in keys:
            cells, means = [], []
            for run, rois, _ in tables:
                hemis = rois.get(group, {}).get(roi, {})
                vals = [hemis.get(p) for p in parts]
                for v in vals:
                    ok = isinstance(v, int | float) and math.isfinite(v)
                    cells.append(
                        {
                            "text": _fmt(v, 3),
                            "width": 100 * abs(v) / scale if ok else 0,
                            "sign": "neg" if ok and v < 0 else "pos",
                        }
                    )
                finite = [v for v in vals if isinstance(v, int | float) and math.isfinite(v)]
                means.append((float(np.mean(finite)) if finite else -math.inf, run.label))
            winner = ""
            if comparable:
                ranked = sorted(means, reverse=True)
                if ranked[0][0] > -math.inf:
                    tied = ranked[0][0] - ranked[1][0] <= 1e-9 * max(abs(ranked[0][0]), 1)
                    winner = "tie" if tied else ranked[0][1]
                    wins[winner] = wins.get(winner, 0) + 1
            rows.append({"group": group, "roi": roi, "cells": cells, "winner": winner})
        return {
            "runs": [{"label": run.label, "metric": m} for run, _, m in tables],
            "parts": parts,
            "rows": rows,
            "comparable": comparable,
            "wins": wins,
            "mixed": len(metrics) > 1,
        }

    # -- distributions and maps -------------------------------------------------------------------------

    def map_metric(self, run: Run) -> str | None:
        """The per-vertex metric shown for `run`: one shared by every run when there is one."""
        shared = self.shared_metric()
        if shared:
            return shared
        if run.test:
            return run.test["metric"]
        return "val_r" if run.vertex else None

    def shared_metric(self) -> str | None:
        tests = {r.test["metric"] if r.test else None for r in self.runs}
        if len(tests) == 1 and None not in tests:
            return tests.pop()
        if all(r.vertex for r in self.runs):
            return "val_r"
        return None

    def histograms(self) -> list[dict]:
        per_run = {r.label: (self.map_metric(r), vertex_scores(r, self.map_metric(r) or "")) for r in self.runs}
        allv = [v[np.isfinite(v)] for _, vals in per_run.values() for v in vals.values()]
        allv = [v for v in allv if len(v)]
        if not allv:
            return []
        cat = np.concatenate(allv)
        lo, hi = np.percentile(cat, [0.5, 99.5])
        bins = np.linspace(min(lo, 0.0), hi if hi > lo else lo + 1, 41)
        out = []
        for run in self.runs:
            metric, vals = per_run[run.label]
            if vals:
                label = METRICS[metric]["label"]
                fig = figures.histogram_figure(vals, label, bins)
                out.append({"label": run.label, "figure": self.figure(fig, f"{label} per vertex, {run.label}")})
        return out

    def maps(self) -> dict:
        """Mean-over-subjects maps per run, per-subject flat maps, noise ceiling, differences, layers."""
        if self.dataset is None:
            return {"note": "no dataset: pass --data ROOT to draw maps (the run's vertices are placed by its masks)"}
        t0 = time.perf_counter()
        per_run, means = {}, {}
        for run in self.runs:
            metric = self.map_metric(run)
            subj = fsaverage_maps(self.dataset, vertex_scores(run, metric)) if metric else {}
            if subj:
                per_run[run.label] = (metric, subj)
                means[run.label] = mean_maps(list(subj.values()))
        if not per_run:
            return {"note": "no per-vertex scores on an fsaverage surface to draw"}
        ranges = {}
        for metric in {m for m, _ in per_run.values()}:
            finite = np.concatenate(
                [means[k][h][np.isfinite(means[k][h])] for k, (m, _) in per_run.items() if m == metric for h in HEMIS]
            )
            hi = float(np.percentile(finite, 99)) if len(finite) else 1.0
            ranges[metric] = (METRICS[metric]["floor"], hi if hi > 0 else 1.0)
        runs = []
        for run in self.runs:
            if run.label not in per_run:
                runs.append({"label": run.label, "note": "no per-vertex scores for this run"})
                continue
            metric, subj = per_run[run.label]
            lo, hi = ranges[metric]
            style = {"cmap": METRICS[metric]["cmap"], "vmin": lo, "vmax": hi}
            label = f"{METRICS[metric]['label']}, mean over {len(subj)} subjects"
            item = {
                "label": run.label,
                "figure": self.figure(figures.surface_figure(means[run.label], label=label, **style), label),
            }
            if self.subject_maps:
                fig = figures.flat_grid_figure(subj, label=METRICS[metric]["label"], **style)
                item["subjects"] = self.figure(fig, f"per-subject flat maps of {run.label}", dpi=90)
            runs.append(item)
        out: dict = {"runs": runs}
        nc = noise_ceiling_maps(self.dataset)
        if nc:
            mean = mean_maps(list(nc.values()))
            label = f"noise ceiling (% of variance), mean over {len(nc)} subjects"
            fig = figures.surface_figure(mean, label=label, cmap="viridis", vmin=0, vmax=100)
            out["noise_ceiling"] = self.figure(fig, label)
        shared = self.shared_metric()
        if len(per_run) > 1 and shared:
            base = self.runs[0]
            diffs = []
            for run in self.runs[1:]:
                a, b = per_run.get(base.label, (None, {}))[1], per_run.get(run.label, (None, {}))[1]
                common = [s for s in b if s in a]
                if not common:
                    continue
                mean = mean_maps([{h: b[s][h] - a[s][h] for h in HEMIS} for s in common])
                finite = np.concatenate([np.abs(mean[h][np.isfinite(mean[h])]) for h in HEMIS])
                lim = float(np.percentile(finite, 99)) if len(finite) else 1.0
                label = f"{METRICS[shared]['label']}: {run.label} − {base.label}, mean over {len(common)} subjects"
                fig = figures.surface_figure(mean, label=label, cmap="RdBu_r", vmin=-(lim or 1), vmax=lim or 1)
                diffs.append({"label": f"{run.label} − {base.label}", "figure": self.figure(fig, label)})
            out["differences"] = diffs
        layers = []
        for run in self.runs:
            pref = layer_preference(run, self.dataset)
            if pref is not None:
                names = list(run.spec.layers) if run.spec else []
                n = next(iter(run.layer_weights.values())).shape[1]
                names = names if len(names) == n else [f"band {k}" for k in range(n)]
                fig = figures.layer_figure(pref, names)
                alt = f"dominant layer per vertex, {run.label}"
                layers.append({"label": run.label, "figure": self.figure(fig, alt)})
        out["layers"] = layers
        self.timings["maps"] = time.perf_counter() - t0
        return out

    # -- the page ---------------------------------------------------------------------------------------

    def context(self, title: str | None) -> dict:
        from blobenc import __version__

        t0 = time.perf_counter()
        ctx = {
            "title": title or "blobenc report: " + ", ".join(r.label for r in self.runs),
            "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "version": __version__,
            "data_root": self.data_root,
            "runs": [{"label": r.label, "about": self.about(r)} for r in self.runs],
            "overview": self.overview(),
            "curves": self.curves(),
            "subjects": self.subjects_table(),
            "rois": self.roi_table(),
            "histograms": self.histograms(),
            "maps": self.maps(),
            "notes": self.notes,
            "incomplete": any(r.incomplete for r in self.runs),
        }
        self.timings["total"] = time.perf_counter() - t0
        logger.debug("report drawn in %.1f s (maps %.1f s)", self.timings["total"], self.timings.get("maps", 0))
        return ctx


def render(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("blobenc.reporting", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(**context)


def write_html(html: str, out: Path) -> Path:
    """Write through a temporary name and a rename: a reader never sees half a page."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out
