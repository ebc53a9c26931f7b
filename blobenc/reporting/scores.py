"""What the report computes from a run and its dataset: test scores of a predictions folder, and the
per-vertex values the histograms and maps show. No plotting here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blobenc.errors import ReportError
from blobenc.reporting.runs import HEMIS, Run
from blobenc.reporting.surface import fsaverage_targets, mean_maps, to_fsaverage5


def open_data(root: Path | str):
    """The dataset at `root`, either layout."""
    from blobenc.data import open_dataset

    return open_dataset(root)


def dataset_group_ids(dataset, subjects: list[str]) -> tuple[np.ndarray, int]:
    """The group space of these subjects of `dataset` as (sorted ids, size), as model.json stores it."""
    ids = np.unique(np.concatenate([np.asarray(dataset.subjects[s].targets, np.int64) for s in subjects]))
    return ids, int(dataset.space_size)


def check_run_data(run: Run, dataset) -> None:
    """The run was fit on this dataset: its subjects are there and span the same target space."""
    subjects = run.spec.subjects if run.spec else None
    if not subjects:
        return
    missing = [s for s in subjects if s not in dataset.subjects]
    if missing:
        raise ReportError(f"{run.path}: fit on subject {missing[0]}, which {dataset.root} does not have")
    ours, theirs = run.group_ids(), dataset_group_ids(dataset, subjects)
    if ours is not None and (ours[1] != theirs[1] or not np.array_equal(ours[0], theirs[0])):
        raise ReportError(
            f"{run.path}: fit on another dataset than {dataset.root} (vertex spaces differ: "
            f"{len(ours[0])} vs {len(theirs[0])} vertices)"
        )


def score_predictions(pred_dir: Path | str, dataset) -> dict | None:
    """Test scores of a predictions folder through `blobenc.predictions.evaluate`: the devkit's
    noise-normalized accuracy where every scored subject has a noise ceiling, else Pearson r.

    Returns {"metric": "score"|"r", "label", "short", "subjects": {name: row}, "rois",
    "vertex": {name: per-target values}, "mean", "path"}, or None when the data has no test responses.
    """
    from blobenc.predictions import evaluate
    from blobenc.scoring import mean_rois, noise_normalized_accuracy, pearson_r, roi_means

    pred_dir = Path(pred_dir)
    names = dataset.prediction_subjects(pred_dir)
    if not all(dataset.subjects[n].has_responses("test") for n in names):
        return None
    result = evaluate(pred_dir, dataset)
    with_nc = all(result["subjects"][n]["score"] is not None for n in names)
    metric = "score" if with_nc else "r"
    vertex, rois = {}, []
    for name in names:
        s = dataset.subjects[name]
        r = pearson_r(dataset.read_predictions(pred_dir, name, "test"), s.responses("test"))
        vertex[name] = noise_normalized_accuracy(r, s.noise_ceiling()) if with_nc else r
        row = result["subjects"][name]
        rois.append(row["rois"] if row.get("rois_metric", metric) == metric else roi_means(s, vertex[name]))
    keys = ("score", "score_nonzero_nc", "median_r") if with_nc else ("mean_r", "median_r")
    return {
        "metric": metric,
        "label": "test noise-normalized accuracy (%)" if with_nc else "test Pearson r",
        "short": "test score (%)" if with_nc else "test r",
        "subjects": {n: {k: result["subjects"][n][k] for k in keys} for n in names},
        "rois": mean_rois(rois),
        "vertex": vertex,
        "mean": result["score"] if with_nc else result["mean_r"],
        "path": str(pred_dir),
    }


def vertex_scores(run: Run, metric: str) -> dict[str, np.ndarray]:
    """subject -> per-vertex values of `metric`: "val_r" / "val_r2" (validation) or the test metric."""
    if metric.startswith("val_"):
        key = metric.removeprefix("val_")
        return {s: v[key] for s, v in run.vertex.items() if key in v}
    if run.test and run.test["metric"] == metric:
        return run.test["vertex"]
    return {}


def fsaverage_maps(dataset, values: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """subject -> {hemi: (10242,)} on fsaverage5, for the subjects of `dataset` (on an fsaverage surface)."""
    out = {}
    for name, v in values.items():
        subject = dataset.subjects.get(name) if dataset is not None else None
        found = fsaverage_targets(subject, dataset) if subject is not None else None
        if found is not None:
            out[name] = to_fsaverage5(v, *found)
    return out


def noise_ceiling_maps(dataset) -> dict[str, dict[str, np.ndarray]]:
    """subject -> fsaverage5 map of the noise ceiling in percent (subjects that ship one)."""
    values = {name: s.noise_ceiling() for name, s in dataset.subjects.items()}
    return fsaverage_maps(dataset, {name: 100 * nc for name, nc in values.items() if nc is not None})


def layer_preference(run: Run, dataset) -> dict[str, np.ndarray] | None:
    """hemi -> index of the dominant layer per fsaverage5 vertex (NaN where no subject has it): the
    banded ridge's per-vertex layer weights, each layer's weight averaged over subjects first."""
    if not run.layer_weights or ((run.spec.ridge if run.spec else None) or {}).get("banded") is False:
        return None  # a plain ridge's weights are all equal: no preference to draw
    n_layers = {w.shape[1] for w in run.layer_weights.values()}
    if len(n_layers) != 1:
        raise ReportError(f"{run.path}/weights: subjects have different numbers of layer weights {sorted(n_layers)}")
    per_layer = []
    for k in range(n_layers.pop()):
        maps = fsaverage_maps(dataset, {s: w[:, k] for s, w in run.layer_weights.items()})
        if not maps:
            return None
        per_layer.append(mean_maps(list(maps.values())))
    out = {}
    for hemi in HEMIS:
        stack = np.stack([m[hemi] for m in per_layer])
        has = np.isfinite(stack).any(0)
        out[hemi] = np.where(has, np.argmax(np.where(np.isfinite(stack), stack, -np.inf), 0), np.nan)
    return out
