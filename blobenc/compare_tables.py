"""The tables of a comparison folder, merged from its units (docs/compare.md, docs/formats.md).

Per subject and target the units hold validation R² and r (and test r, R², noise-normalized score
where the data has test responses); here they become means per ROI and subject (scores.csv), means
over subjects (leaderboard.csv), each model's best layer per ROI (best_layers.csv), the best model
per ROI (best_models.csv), the variance partition per ROI (partition.csv), and summary.json. The
per-target maps the report draws come from `vertex_maps`.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from blobenc.files import atomic_path, read_json, write_json

ALL = "all-layers"
PARTITION = "partition"
METRICS = ("val_r2", "val_r", "test_r2", "test_r", "test_score")
EVERY = ("all", "all")  # the (group, roi) row over every target of a subject


def _unit(out: Path, source: str, feature_set: str, subject: str) -> Path:
    return out / "units" / source / feature_set / f"{subject}.safetensors"


def feature_sets(header: dict) -> list[tuple[str, str, float | None]]:
    """(cache label, feature set, relative depth or None for all layers) in table order."""
    out = []
    for c in header["caches"]:
        out += [(c["label"], layer, c["depth"][layer]) for layer in c["layers"]]
        if header["config"]["all_layers"]:
            out.append((c["label"], ALL, None))
    return out


def missing_units(out: Path, header: dict | None = None) -> list[Path]:
    header = header or read_json(out / "compare.json")
    want = [_unit(out, m, fs, s) for m, fs, _ in feature_sets(header) for s in header["subjects"]]
    if header.get("partition"):
        want += [out / "units" / PARTITION / f"{s}.safetensors" for s in header["subjects"]]
    return [p for p in want if not p.is_file()]


def _load(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _roi_masks(subject) -> list[tuple[str, str, np.ndarray]]:
    """(group, roi, boolean mask over the subject's targets), the row over every target first."""
    masks = [(*EVERY, np.ones(subject.n_targets, bool))]
    for group, (labels, names) in subject.rois().items():
        for label, name in sorted(names.items()):
            if label != 0 and (labels == label).any():
                masks.append((group, name, labels == label))
    return masks


def _mean(v: np.ndarray | None, mask: np.ndarray) -> float | None:
    if v is None:
        return None
    x = v[mask]
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def merge(out: Path, dataset) -> dict:
    """Write scores.csv, leaderboard.csv, best_layers.csv, best_models.csv, partition.csv (with a
    partition) and summary.json from the units; returns the summary."""
    out = Path(out)
    header = read_json(out / "compare.json")
    sets = feature_sets(header)
    subjects = header["subjects"]
    masks = {s: _roi_masks(dataset.subjects[s]) for s in subjects}
    scores = []
    for model, fs, depth in sets:
        for s in subjects:
            unit = _load(_unit(out, model, fs, s))
            for group, roi, mask in masks[s]:
                row = {"model": model, "layer": fs, "depth": depth, "subject": s, "group": group, "roi": roi}
                row["n_targets"] = int(mask.sum())
                row |= {m: _mean(unit.get(m), mask) for m in METRICS}
                scores.append(row)
    board = _leaderboard(scores)
    best_layers = _best_layers(board)
    best_models = _best_models(best_layers)
    _write_csv(out / "scores.csv", scores)
    _write_csv(out / "leaderboard.csv", board)
    _write_csv(out / "best_layers.csv", best_layers)
    _write_csv(out / "best_models.csv", best_models)
    summary = {
        "kind": "compare",
        "caches": header["caches"],
        "subjects": subjects,
        "config": header["config"],
        "overall": [r for r in board if (r["group"], r["roi"]) == EVERY],
        "best_layers": best_layers,
        "best_models": best_models,
    }
    if header.get("partition"):
        part = _partition(out, subjects, masks)
        _write_csv(out / "partition.csv", part)
        summary["partition"] = {
            "a": header["partition"][0]["text"],
            "b": header["partition"][1]["text"],
            "rois": [r for r in part if r["subject"] == "mean"],
        }
    write_json(out / "summary.json", summary)
    return summary


def _leaderboard(scores: list[dict]) -> list[dict]:
    """Means over subjects per (model, layer, group, roi), keeping the first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in scores:
        groups.setdefault((r["model"], r["layer"], r["group"], r["roi"]), []).append(r)
    board = []
    for (model, layer, group, roi), rs in groups.items():
        row = {"model": model, "layer": layer, "depth": rs[0]["depth"], "group": group, "roi": roi}
        row["n_subjects"] = len(rs)
        for m in METRICS:
            vals = [r[m] for r in rs if r[m] is not None]
            row[m] = float(np.mean(vals)) if vals else None
        board.append(row)
    return board


def _best_layers(board: list[dict]) -> list[dict]:
    """Each model's best single layer per ROI by mean validation R², with its all-layers score."""
    best: dict[tuple, dict] = {}
    together: dict[tuple, float | None] = {}
    for r in board:
        key = (r["model"], r["group"], r["roi"])
        if r["layer"] == ALL:
            together[key] = r["val_r2"]
            continue
        if r["val_r2"] is not None and (key not in best or r["val_r2"] > best[key]["val_r2"]):
            best[key] = r
    return [
        {
            "model": m,
            "group": g,
            "roi": roi,
            "layer": r["layer"],
            "depth": r["depth"],
            "val_r2": r["val_r2"],
            "val_r": r["val_r"],
            "test_score": r["test_score"],
            "all_layers_val_r2": together.get((m, g, roi)),
        }
        for (m, g, roi), r in best.items()
    ]


def _best_models(best_layers: list[dict]) -> list[dict]:
    """The model whose best layer scores highest per ROI, and the runner-up."""
    per_roi: dict[tuple, list[dict]] = {}
    for r in best_layers:
        per_roi.setdefault((r["group"], r["roi"]), []).append(r)
    out = []
    for (group, roi), rs in per_roi.items():
        ranked = sorted(rs, key=lambda r: -r["val_r2"])
        top = ranked[0]
        second = ranked[1] if len(ranked) > 1 else None
        out.append(
            {
                "group": group,
                "roi": roi,
                "model": top["model"],
                "layer": top["layer"],
                "depth": top["depth"],
                "val_r2": top["val_r2"],
                "runner_up": second["model"] if second else None,
                "runner_up_val_r2": second["val_r2"] if second else None,
                "margin": top["val_r2"] - second["val_r2"] if second else None,
            }
        )
    return out


def partition_parts(unit: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per target: R² of A, B, A and B together, the unique part of each and the shared part."""
    a, b, ab = unit["a_r2"].astype(np.float64), unit["b_r2"].astype(np.float64), unit["ab_r2"].astype(np.float64)
    return {"r2_a": a, "r2_b": b, "r2_ab": ab, "unique_a": ab - b, "unique_b": ab - a, "shared": a + b - ab}


def _partition(out: Path, subjects: list[str], masks) -> list[dict]:
    """Per subject and ROI: the mean per target of each part (a fraction of variance), and the sum
    over the ROI's targets; then the means over subjects (subject "mean")."""
    rows = []
    for s in subjects:
        parts = partition_parts(_load(out / "units" / PARTITION / f"{s}.safetensors"))
        for group, roi, mask in masks[s]:
            row = {"subject": s, "group": group, "roi": roi, "n_targets": int(mask.sum())}
            row |= {k: _mean(v, mask) for k, v in parts.items()}
            row |= {f"{k}_sum": float(np.nansum(v[mask])) for k, v in parts.items() if k != "r2_ab"}
            rows.append(row)
    keys = [k for k in rows[0] if k not in ("subject", "group", "roi")] if rows else []
    means: dict[tuple, list[dict]] = {}
    for r in rows:
        means.setdefault((r["group"], r["roi"]), []).append(r)
    for (group, roi), rs in means.items():
        row = {"subject": "mean", "group": group, "roi": roi}
        for k in keys:
            vals = [r[k] for r in rs if r[k] is not None and math.isfinite(r[k])]
            row[k] = float(np.mean(vals)) if vals else None
        rows.append(row)
    return rows


def vertex_maps(out: Path) -> dict:
    """Per subject and target, what the report maps: for every model the relative depth of its
    best layer (by validation R²) and that R²; the winning model (index into the caches) and its
    R²; with a partition, each part. {"models": [...], "subjects": {s: {...}}}."""
    out = Path(out)
    header = read_json(out / "compare.json")
    models = [c["label"] for c in header["caches"]]
    maps: dict = {}
    for s in header["subjects"]:
        entry: dict = {"depth": {}, "best_r2": {}}
        for c in header["caches"]:
            r2 = np.stack([_load(_unit(out, c["label"], layer, s))["val_r2"] for layer in c["layers"]])
            depths = np.asarray([c["depth"][layer] for layer in c["layers"]])
            entry["depth"][c["label"]] = depths[np.argmax(r2, 0)]
            entry["best_r2"][c["label"]] = r2.max(0)
        stacked = np.stack([entry["best_r2"][m] for m in models])
        entry["winner"] = np.argmax(stacked, 0).astype(np.float64)
        entry["winner_r2"] = stacked.max(0)
        part = out / "units" / PARTITION / f"{s}.safetensors"
        if header.get("partition") and part.is_file():
            entry["partition"] = partition_parts(_load(part))
        maps[s] = entry
    return {"models": models, "partition": header.get("partition"), "subjects": maps}
