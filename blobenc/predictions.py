"""Prediction files of any dataset layout: score and package them.

Each layout writes and reads its own files through the dataset (`write_predictions`,
`read_predictions`): the Algonauts layout `PRED/subjNN/{lh,rh}_pred_<split>.npy`, the generic
layout `PRED/<name>/pred_<split>.npy` plus `PRED/<name>/<split>.csv` with the row keys. Both hold
the subject's own target order; scoring works on the whole (rows, n_targets) array.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from blobenc.data.base import Dataset, Subject
from blobenc.errors import DataError, PredictionError
from blobenc.files import atomic_path
from blobenc.scoring import noise_normalized_accuracy, pearson_r, r2_score

SUBMISSION_FOLDER = "algonauts_2023_challenge_submission"


def prediction_path(pred_dir: Path, subject: str, hemi: str, split: str = "test") -> Path:
    """An Algonauts-layout prediction file: PRED/subjNN/<hemi>_pred_<split>.npy."""
    return Path(pred_dir) / subject / f"{hemi}_pred_{split}.npy"


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


def evaluate(pred_dir: Path | str, dataset: Dataset, split: str = "test") -> dict:
    """Score every subject folder in `pred_dir`; the top level averages over subjects.

    Every file is read and checked before anything is scored."""
    names = dataset.prediction_subjects(Path(pred_dir))
    for name in names:
        if not dataset.subjects[name].has_responses(split):
            raise DataError(f"{dataset.subjects[name].path}: no {split} responses to score {pred_dir}/{name} against")
    preds = {name: dataset.read_predictions(Path(pred_dir), name, split) for name in names}
    return summarize({name: score_subject(dataset.subjects[name], preds[name], split) for name in names})


def submit(pred_dir: Path | str, dataset: Dataset, out: Path | str) -> Path:
    """Check every subject's test predictions and zip them in the Algonauts challenge layout."""
    pred_dir, out = Path(pred_dir), Path(out)
    if dataset.layout != "algonauts":
        raise DataError(
            f"{dataset.root}: submit packages the Algonauts 2023 challenge layout; this is {dataset.layout}"
        )
    if out.suffix != ".zip":
        raise PredictionError(f"{out}: the submission file must end in .zip")
    for name in dataset.subjects:  # validate everything before writing anything
        dataset.read_predictions(pred_dir, name, "test")
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in dataset.subjects:
            for hemi in ("lh", "rh"):
                path = prediction_path(pred_dir, name, hemi, "test")
                zf.write(path, f"{SUBMISSION_FOLDER}/{name}/{path.name}")
    return out
