"""Prediction files (`PRED/subjNN/{lh,rh}_pred_<split>.npy`): read, score and package them."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from blobenc.data.algonauts import HEMIS, ROI_GROUPS, AlgonautsDataset, Subject
from blobenc.errors import DataError, PredictionError
from blobenc.scoring import noise_normalized_accuracy, pearson_r, r2_score

SUBMISSION_FOLDER = "algonauts_2023_challenge_submission"


def prediction_path(pred_dir: Path, subject: str, hemi: str, split: str = "test") -> Path:
    return Path(pred_dir) / subject / f"{hemi}_pred_{split}.npy"


def write_predictions(pred_dir: Path, subject: Subject, native: np.ndarray, split: str = "test") -> None:
    """Split a (n_images, n_vertices) native-order prediction into the lh/rh files."""
    folder = Path(pred_dir) / subject.name
    folder.mkdir(parents=True, exist_ok=True)
    n_lh = subject.n_vertices["lh"]
    for hemi, part in (("lh", native[:, :n_lh]), ("rh", native[:, n_lh:])):
        tmp = folder / f".{hemi}_pred_{split}.npy.tmp"
        with tmp.open("wb") as f:  # np.save on a path would append .npy to the temp name
            np.save(f, np.ascontiguousarray(part, dtype=np.float32))
        tmp.replace(prediction_path(pred_dir, subject.name, hemi, split))


def read_prediction(pred_dir: Path, subject: Subject, hemi: str, split: str = "test") -> np.ndarray:
    """One hemisphere's predictions, checked for shape, dtype float32 and finite values."""
    path = prediction_path(pred_dir, subject.name, hemi, split)
    if not path.is_file():
        raise PredictionError(f"{path}: prediction file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise PredictionError(f"{path}: not a readable .npy array ({e})") from None
    expected = (len(subject.images[split]), subject.n_vertices[hemi])
    if arr.shape != expected:
        raise PredictionError(f"{path}: expected shape {expected} (images x {hemi} vertices), found {arr.shape}")
    if arr.dtype != np.float32:
        raise PredictionError(f"{path}: expected dtype float32, found {arr.dtype}")
    if not np.isfinite(arr).all():
        raise PredictionError(f"{path}: holds NaN or inf values; every prediction must be finite")
    return arr


def predicted_subjects(pred_dir: Path, dataset: AlgonautsDataset) -> list[str]:
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise PredictionError(f"{pred_dir}: prediction folder not found")
    names = sorted(p.name for p in pred_dir.iterdir() if p.is_dir() and p.name.startswith("subj"))
    unknown = [n for n in names if n not in dataset.subjects]
    if unknown:
        raise PredictionError(f"{pred_dir / unknown[0]}: subject not in the data ({', '.join(dataset.subjects)})")
    if not names:
        raise PredictionError(f"{pred_dir}: no subject folders (expected subj01/lh_pred_test.npy, ...)")
    return names


def roi_means(subject: Subject, values: dict[str, np.ndarray]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Mean of a per-vertex value over each ROI of the subject's roi_masks: {group: {roi: {lh, rh}}}."""
    rois: dict[str, dict[str, dict[str, float | None]]] = {}
    for group in ROI_GROUPS:
        for hemi in HEMIS:
            found = subject.roi_labels(group, hemi)
            if found is None:
                continue
            labels, names = found
            for label, name in sorted(names.items()):
                if label == 0:
                    continue
                vals = values[hemi][labels == label]
                vals = vals[np.isfinite(vals)]  # vertices without a score (NaN) are left out
                entry = rois.setdefault(group, {}).setdefault(name, {"lh": None, "rh": None})
                entry[hemi] = float(vals.mean()) if len(vals) else None
    return rois


def mean_rois(per_subject: list[dict]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Average {group: {roi: {hemi: value}}} tables over subjects, ignoring missing entries."""
    acc: dict = {}
    for rois in per_subject:
        for group, entries in rois.items():
            for roi, hemis in entries.items():
                for hemi, v in hemis.items():
                    if v is not None:
                        acc.setdefault(group, {}).setdefault(roi, {}).setdefault(hemi, []).append(v)
    return {
        g: {r: {h: (sum(v) / len(v) if (v := hs.get(h)) else None) for h in HEMIS} for r, hs in e.items()}
        for g, e in acc.items()
    }


def score_subject(subject: Subject, pred: dict[str, np.ndarray], split: str = "test") -> dict:
    """Scores of one subject's lh/rh predictions against its fMRI and noise ceilings."""
    if not subject.has_fmri(split):
        raise DataError(f"{subject.path}: no {split} fMRI to score against")
    r, r2, nna = {}, {}, {}
    for hemi in HEMIS:
        target = np.asarray(subject.fmri(split, hemi))
        r[hemi] = pearson_r(pred[hemi], target)
        r2[hemi] = r2_score(pred[hemi], target)
        nc = subject.noise_ceiling(hemi)
        if nc is None:
            raise DataError(f"{subject.path}/test_split/noise_ceiling/{hemi}_noise_ceiling.npy: file not found")
        nna[hemi] = (noise_normalized_accuracy(r[hemi], nc), nc > 0)
    all_nna = np.concatenate([nna[h][0] for h in HEMIS])
    nonzero = np.concatenate([nna[h][1] for h in HEMIS])
    all_r = np.concatenate([r[h] for h in HEMIS])
    rois = roi_means(subject, {h: nna[h][0] for h in HEMIS})
    return {
        "score": float(all_nna.mean()),
        "score_nonzero_nc": float(all_nna[nonzero].mean()) if nonzero.any() else float("nan"),
        "median_r": float(np.median(all_r)),
        "mean_r": float(all_r.mean()),
        "median_r2": float(np.median(np.concatenate([r2[h] for h in HEMIS]))),
        "n_vertices": len(all_r),
        "n_zero_nc": int((~nonzero).sum()),
        "rois": rois,
    }


def evaluate(pred_dir: Path | str, dataset: AlgonautsDataset, split: str = "test") -> dict:
    """Score every subject folder in `pred_dir`; the top level averages over subjects."""
    subjects = {}
    for name in predicted_subjects(Path(pred_dir), dataset):
        subject = dataset.subjects[name]
        pred = {h: read_prediction(Path(pred_dir), subject, h, split) for h in HEMIS}
        subjects[name] = score_subject(subject, pred, split)
    return {
        "score": float(np.mean([s["score"] for s in subjects.values()])),
        "score_nonzero_nc": float(np.mean([s["score_nonzero_nc"] for s in subjects.values()])),
        "median_r": float(np.mean([s["median_r"] for s in subjects.values()])),
        "subjects": subjects,
    }


def submit(pred_dir: Path | str, dataset: AlgonautsDataset, out: Path | str) -> Path:
    """Check every subject's test predictions and zip them in the challenge layout."""
    pred_dir, out = Path(pred_dir), Path(out)
    if out.suffix != ".zip":
        raise PredictionError(f"{out}: the submission file must end in .zip")
    for subject in dataset.subjects.values():  # validate everything before writing anything
        for hemi in HEMIS:
            read_prediction(pred_dir, subject, hemi, "test")
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in dataset.subjects:
            for hemi in HEMIS:
                path = prediction_path(pred_dir, name, hemi, "test")
                zf.write(path, f"{SUBMISSION_FOLDER}/{name}/{path.name}")
    tmp.replace(out)
    return out
