"""`blobenc predict RUN_A RUN_B ... --select vertex|subject|blend`: per-vertex model selection.

Runs validated on the same images (same split file) each kept their per-vertex validation r
(`val_vertex.safetensors`). Each vertex of each subject then takes the prediction of the run with
the best validation r there (`vertex`), or each subject the run with the best mean r (`subject`),
or a blend weighted by max(r, 0)² (`blend`). Ridge and head runs mix freely.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from blobenc.data.base import ValidationSplit, open_dataset
from blobenc.errors import ConfigError
from blobenc.predict import PredictionStaging, predict
from blobenc.predictions import score_subject
from blobenc.train.checkpoint import resolve_run, save_weights, write_json

SELECT_MODES = ("vertex", "subject", "blend")


def _run_file(run: Path, name: str) -> Path | None:
    """A file of the run: in the trial folder it stands for, or in the run (sweep) folder above."""
    for folder in (resolve_run(run), Path(run)):
        if (folder / name).is_file():
            return folder / name
    return None


def selection_weights(r: np.ndarray, mode: str) -> np.ndarray:
    """(runs, vertices) weights summing to 1 per vertex from validation r of each run."""
    if mode not in SELECT_MODES:
        raise ConfigError(f"--select {mode!r}: expected one of {', '.join(SELECT_MODES)}")
    r = np.nan_to_num(np.asarray(r, dtype=np.float64), nan=0.0)  # a vertex with no score: r = 0
    if mode == "blend":
        w = np.maximum(r, 0) ** 2
        total = w.sum(0, keepdims=True)
        return np.where(total > 0, w / np.where(total > 0, total, 1), 1 / len(r))
    best = r.argmax(0) if mode == "vertex" else np.full(r.shape[1], r.mean(1).argmax())
    return (np.arange(len(r))[:, None] == best[None, :]).astype(np.float64)


def predict_selected(
    runs: list[Path | str],
    data_root: Path | str,
    out: Path | str,
    select: str = "blend",  # measured above vertex on two datasets (docs/benchmarks.md)
    subjects: str = "all",
    progress: bool = True,
    **predict_kwargs,
) -> dict:
    """Predict the test rows with every run, then combine them per vertex (or subject) by validation r.
    Writes the predictions, `selection.json` (shares and validation r per subject) and
    `selection.safetensors` (`<subject>.weights`, runs x vertices). Returns scores where test
    responses exist, and the selection summary under "selection"."""
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ConfigError("--select needs two runs or more")
    if select not in SELECT_MODES:
        raise ConfigError(f"--select {select!r}: expected one of {', '.join(SELECT_MODES)}")
    splits, vertex = [], []
    for run in runs:
        split_file, vertex_file = _run_file(run, "split.json"), _run_file(run, "val_vertex.safetensors")
        if split_file is None or vertex_file is None:
            raise ConfigError(
                f"{run}: no split.json or val_vertex.safetensors (per-vertex validation scores): "
                "selection needs runs validated by this version of blobenc"
            )
        splits.append(ValidationSplit.load(split_file))
        vertex.append(load_file(vertex_file))
    for run, split in zip(runs[1:], splits[1:], strict=True):
        if not np.array_equal(split.val_keys, splits[0].val_keys):
            raise ConfigError(
                f"{run}: validated on other images than {runs[0]} (its split.json differs); select among runs "
                "fitted with the same --val-fraction and --seed on the same data"
            )
    dataset = open_dataset(data_root)
    names = [n for n in dataset.subjects if all(f"{n}.r" in v for v in vertex)]
    if subjects != "all":
        if subjects not in names:
            raise ConfigError(f"--subject {subjects}: not validated by every run ({', '.join(names)})")
        names = [subjects]
    if not names:
        raise ConfigError("no subject has validation scores in every run")
    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix=".select-", dir=out.parent if out.parent.exists() else None))
    try:
        for k, run in enumerate(runs):
            predict(run, data_root, work / str(k), subjects, progress=progress, **predict_kwargs)
        summary, weights, scores = {}, {}, {}
        with PredictionStaging(out) as staging:
            for name in names:
                r = np.stack([v[f"{name}.r"].numpy() for v in vertex])
                w = selection_weights(r, select)
                preds = [dataset.read_predictions(work / str(k), name, "test") for k in range(len(runs))]
                combined = sum(p * wk[None, :] for p, wk in zip(preds, w.astype(np.float32), strict=True))
                dataset.write_predictions(staging.path, name, combined.astype(np.float32), "test")
                weights[f"{name}.weights"] = torch.from_numpy(w.astype(np.float32))
                summary[name] = {
                    "share": [float(s) for s in w.mean(1)],
                    "val_mean_r_runs": [float(np.nanmean(x)) for x in r],
                    "val_mean_r": float(np.nanmean((w * np.nan_to_num(r)).sum(0))),
                }
                if dataset.subjects[name].has_responses("test"):
                    scores[name] = score_subject(dataset.subjects[name], combined, "test")
            result = {"select": select, "runs": [str(r) for r in runs], "subjects": summary}
            write_json(staging.path / "selection.json", result)
            save_weights(staging.path / "selection.safetensors", weights, {"runs": json.dumps(result["runs"])})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"scores": scores, "selection": result}
