"""Validation of trials under training: their group-space predictions of the validation samples
in one pass, the scores the best epoch is chosen by, and the tables and files a run leaves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from blobenc.profile import timed
from blobenc.scoring import mean_rois, pearson_r, pooled_r2, r2_score, roi_means, validation_scores
from blobenc.train.checkpoint import save_weights
from blobenc.train.step import Trial, predict_group


@timed("predict")
def val_predictions(trials: list[Trial], data, batch_size: int, device, amp) -> list[np.ndarray]:
    """Group-space predictions (N_val, V) of the validation samples, in sample order, for every
    trial from one pass over the validation data (a streamed cache is read once, not per trial)."""
    # written in place batch by batch: a list of batches and its concatenation were two more copies
    preds = [np.empty((len(data.sets["val"]), data.group.n_vertices), dtype=np.float32) for _ in trials]
    with torch.no_grad():
        for idx, feats, subject in data.val_batches(batch_size):
            for pred, trial in zip(preds, trials, strict=True):
                inputs = [([feats[j] for j in trial.layer_idx], subject)]
                pred[idx] = predict_group(trial.model, iter(inputs), device, amp).numpy()
    return preds


@timed("roi tables")
def val_tables(pred: np.ndarray, data) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validation beyond the headline, from group-space predictions `pred` of the validation samples:
    R² per ROI and hemisphere (each vertex's R² pooled over subjects, as the headline median,
    averaged over the subjects' ROI masks), and per subject its own Pearson r and R² at each of its
    native vertices (`<subject>.r`, `<subject>.r2`), which `val_vertex.safetensors` keeps for maps.
    Shared by every run kind (fit-head, finetune, fit-ridge)."""

    observed = data.observed("val")
    r2 = pooled_r2(pred, data.val_target, observed)
    tables, vertex = [], {}
    subject_of = data.sets["val"].subject
    for i, name in enumerate(data.subjects):
        subject = data.dataset.subjects[name]
        cols = data.group_index[name]
        native = r2[cols]
        tables.append(roi_means(subject, native))
        rows = subject_of == i
        if rows.sum() >= 2:
            p, t = pred[rows][:, cols], data.val_target[rows][:, cols]
            vertex[f"{name}.r"] = torch.from_numpy(pearson_r(p, t).astype(np.float32))
            vertex[f"{name}.r2"] = torch.from_numpy(r2_score(p, t).astype(np.float32))
    return mean_rois(tables), vertex


VAL_PRED_FILE = "val_pred.safetensors"


def save_validation(out: Path, pred: np.ndarray, data, trial: str) -> dict:
    """Write what a run's validation leaves for maps and for combining runs: per-vertex r and R²
    (`val_vertex.safetensors`) and each subject's validation predictions in its native vertices,
    rows in the split's order (`val_pred.safetensors`, float16). Returns the ROI table."""
    rois, vertex = val_tables(pred, data)
    save_weights(out / "val_vertex.safetensors", vertex, {"trial": trial})
    subject_of = data.sets["val"].subject
    native = {
        name: torch.from_numpy(pred[subject_of == i][:, data.group_index[name]].astype(np.float16))
        for i, name in enumerate(data.subjects)
    }
    save_weights(out / VAL_PRED_FILE, native, {"trial": trial})
    return rois


def evaluate_trials(trials: list[Trial], data, batch_size: int, device, amp) -> list[dict]:
    """Validation scores of every trial, from one pass over the validation data."""
    s = data.sets["val"]
    return [
        validation_scores(pred, data.val_target, s.subject, data.subjects, data.group_index, data.group.n_vertices)
        for pred in val_predictions(trials, data, batch_size, device, amp)
    ]
