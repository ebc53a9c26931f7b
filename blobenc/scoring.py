"""Per-vertex scores, computed as the Algonauts 2023 devkit does (docs/model.md, "Scores")."""

from __future__ import annotations

import numpy as np

from blobenc.data.base import Subject
from blobenc.errors import DataError, PredictionError
from blobenc.profile import timed

# The devkit replaces a noise ceiling of exactly 0 with this before dividing.
ZERO_CEILING = 1e-14


def pearson_r(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r per column of two (n_samples, n_vertices) arrays.

    A column with zero variance in either array has no defined r; it scores 0,
    so a constant predictor is worth nothing rather than NaN.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    p = p - p.mean(0)
    t = t - t.mean(0)
    denom = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    num = (p * t).sum(0)
    return np.divide(num, denom, out=np.zeros_like(num), where=denom > 0)


def r2_score(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Coefficient of determination 1 - SSE/SST per column (0 where SST is 0)."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    sse = ((t - p) ** 2).sum(0)
    sst = ((t - t.mean(0)) ** 2).sum(0)
    return np.divide(sst - sse, sst, out=np.zeros_like(sse), where=sst > 0)


def noise_normalized_accuracy(r: np.ndarray, noise_ceiling: np.ndarray) -> np.ndarray:
    """Devkit score per vertex in percent: max(r, 0)^2 / ceiling * 100, clipped at 100.

    `noise_ceiling` is a fraction in [0, 1]; a ceiling of exactly 0 becomes 1e-14.
    """
    nc = np.where(np.asarray(noise_ceiling, dtype=np.float64) == 0, ZERO_CEILING, noise_ceiling)
    return np.minimum(np.maximum(r, 0) ** 2 / nc * 100, 100)


def roi_means(subject: Subject, values: np.ndarray) -> dict[str, dict[str, dict[str, float | None]]]:
    """Mean of a per-target value over each ROI of the subject, per part of its target space:
    {group: {roi: {lh, rh}}} on a surface, {group: {roi: {all}}} otherwise. Targets without a
    value (NaN) are left out; an ROI with none in a part is None there."""
    values = np.asarray(values)
    rois: dict[str, dict[str, dict[str, float | None]]] = {}
    parts = subject.parts
    for group, (labels, names) in subject.rois().items():
        for label, name in sorted(names.items()):
            if label == 0:
                continue
            entry = rois.setdefault(group, {}).setdefault(name, {})
            for part, mask in parts.items():
                vals = values[mask & (labels == label)]
                vals = vals[np.isfinite(vals)]
                entry[part] = float(vals.mean()) if len(vals) else None
    return rois


def mean_rois(per_subject: list[dict]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Average {group: {roi: {part: value}}} tables over subjects, ignoring missing entries."""
    acc: dict = {}
    order: dict[str, None] = {}
    for rois in per_subject:
        for group, entries in rois.items():
            for roi, values in entries.items():
                for part, v in values.items():
                    order.setdefault(part)
                    slot = acc.setdefault(group, {}).setdefault(roi, {}).setdefault(part, [])
                    if v is not None:
                        slot.append(v)
    return {
        g: {r: {p: (sum(v) / len(v) if (v := ps.get(p)) else None) for p in order} for r, ps in e.items()}
        for g, e in acc.items()
    }


def score_subject(subject: Subject, pred: np.ndarray, split: str = "test") -> dict:
    """Scores of one subject's (rows, n_targets) predictions against its responses.

    Pearson r and R² per target always; with a noise ceiling also the devkit's noise-normalized
    accuracy (`score`, in percent); without one `score` is None and the ROI table holds r.
    """
    if not subject.has_responses(split):
        raise DataError(f"{subject.path}: no {split} responses to score against")
    target = subject.responses(split)
    if pred.shape != target.shape:
        raise PredictionError(f"{subject.name}: predictions of shape {pred.shape}, responses {target.shape}")
    r = pearson_r(pred, target)
    r2 = r2_score(pred, target)
    nc = subject.noise_ceiling()
    out = {
        "score": None,
        "score_nonzero_nc": None,
        "median_r": float(np.median(r)),
        "mean_r": float(r.mean()),
        "median_r2": float(np.median(r2)),
        "mean_r2": float(r2.mean()),
        "n_vertices": len(r),
        "n_zero_nc": None,
    }
    if nc is None:
        return out | {"rois": roi_means(subject, r), "rois_metric": "r"}
    nna = noise_normalized_accuracy(r, nc)
    nonzero = nc > 0
    return out | {
        "score": float(nna.mean()),
        "score_nonzero_nc": float(nna[nonzero].mean()) if nonzero.any() else float("nan"),
        "n_zero_nc": int((~nonzero).sum()),
        "rois": roi_means(subject, nna),
        "rois_metric": "score",
    }


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(subjects: dict[str, dict]) -> dict:
    """Scores of several subjects: each headline averaged over the subjects that have it."""
    return {
        "score": _mean([s["score"] for s in subjects.values()]),
        "score_nonzero_nc": _mean([s["score_nonzero_nc"] for s in subjects.values()]),
        "median_r": _mean([s["median_r"] for s in subjects.values()]),
        "mean_r": _mean([s["mean_r"] for s in subjects.values()]),
        "median_r2": _mean([s["median_r2"] for s in subjects.values()]),
        "subjects": subjects,
    }


def observed_mask(
    subject: np.ndarray, subjects: list[str], group_index: dict[str, np.ndarray], n_vertices: int
) -> np.ndarray:
    """(N, V) True where sample n's subject has vertex v."""
    observed = np.zeros((len(subject), n_vertices), dtype=bool)
    for i, name in enumerate(subjects):
        observed[np.ix_(subject == i, group_index[name])] = True
    return observed


def pooled_r2(pred: np.ndarray, target: np.ndarray, observed: np.ndarray, block: int = 2048) -> np.ndarray:
    """R² per group vertex over every sample that observes it (NaN where fewer than 2 do).

    Pooling the subjects' validation samples gives each vertex a stable score even when
    one subject holds only a few validation images. Computed `block` vertices at a time: whole
    (N, V) temporaries were three more copies of the validation targets (3.7 GB at the full NSD)."""
    out = np.empty(pred.shape[1])
    for lo in range(0, pred.shape[1], block):
        cols = slice(lo, lo + block)
        seen, t = observed[:, cols], target[:, cols]
        count = seen.sum(0)
        mean = np.where(seen, t, 0).sum(0) / np.maximum(count, 1)
        sse = np.where(seen, (t - pred[:, cols]) ** 2, 0).sum(0)
        sst = np.where(seen, (t - mean) ** 2, 0).sum(0)
        out[cols] = np.where(count >= 2, 1 - sse / np.maximum(sst, 1e-12), np.nan)
    return out


@timed("scores")
def validation_scores(
    pred: np.ndarray,
    target: np.ndarray,
    subject: np.ndarray,
    subjects: list[str],
    group_index: dict[str, np.ndarray],
    n_vertices: int,
) -> dict:
    """Median R² over group vertices, pooling every validation sample whose subject has the vertex
    (missing vertices excluded); mean Pearson r over subjects; both per subject on its own vertices."""
    observed = observed_mask(subject, subjects, group_index, n_vertices)
    per_subject = {}
    for i, name in enumerate(subjects):
        rows = subject == i
        cols = group_index[name]
        if rows.sum() < 2:
            continue
        r2 = r2_score(pred[rows][:, cols], target[rows][:, cols])
        r = pearson_r(pred[rows][:, cols], target[rows][:, cols])
        per_subject[name] = {"median_r2": float(np.median(r2)), "mean_r": float(r.mean()), "n": int(rows.sum())}
    r2 = pooled_r2(pred, target, observed)
    return {
        "median_r2": float(np.nanmedian(r2)),
        "mean_r": float(np.mean([s["mean_r"] for s in per_subject.values()])) if per_subject else float("nan"),
        "subjects": per_subject,
    }
