"""`blobenc predict RUN_A RUN_B ... --select stack|vertex|subject`: combining runs.

Runs validated on the same images (same split file) each kept their validation predictions
(`val_pred.safetensors`) and per-vertex validation r (`val_vertex.safetensors`). `stack` (the
default) weights the runs per vertex by non-negative least squares on the validation responses,
shrunk toward the subject's pooled weights as far as cross-fitting over validation folds says, and
keeps a single run where it cross-fits better: a run of the wrong scale or of noise gets weight ~0,
and the combination does not lose to its best member. `vertex` takes per vertex the run with the
best validation r; `subject` per subject the run with the best mean r. Ridge and head runs mix freely.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from blobenc.data import open_dataset
from blobenc.data.base import ValidationSplit
from blobenc.errors import ConfigError
from blobenc.files import write_json
from blobenc.predictions import PredictionStaging, predict
from blobenc.scoring import score_subject
from blobenc.train.checkpoint import resolve_run, save_weights
from blobenc.train.validation import VAL_PRED_FILE

SELECT_MODES = ("stack", "vertex", "subject")
MAX_STACK = 8  # runs: the exact non-negative solve tries every subset of them

SHRINKS = (0.0, 0.3, 3.0, 30.0, math.inf)  # per-vertex weights pulled toward the subject's pooled ones


def _nnls(A: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per row: argmin_w 0.5 w^T A w - c^T w over w >= 0, exactly, by trying every support (the
    optimum is the unconstrained one on its support, all positive there). A (V, K, K), c (V, K)."""
    v, k = c.shape
    best_w = torch.zeros_like(c)
    best_obj = torch.zeros(v, dtype=c.dtype)  # w = 0
    for support in range(1, 2**k):
        idx = [j for j in range(k) if support >> j & 1]
        w = torch.zeros_like(c)
        w[:, idx] = torch.linalg.solve(A[:, idx][:, :, idx], c[:, idx])
        obj = 0.5 * torch.einsum("vk,vkj,vj->v", w, A, w) - (c * w).sum(1)
        better = (w[:, idx] >= 0).all(1) & (obj < best_obj)
        best_w[better], best_obj[better] = w[better], obj[better]
    return best_w


class _Equations:
    """Normal equations of the stack, per vertex: G (V, K, K), b (V, K), and the target's energy yy (V,)."""

    def __init__(self, G: torch.Tensor, b: torch.Tensor, yy: torch.Tensor):
        self.G, self.b, self.yy = G, b, yy

    @classmethod
    def of(cls, P: torch.Tensor, y: torch.Tensor) -> _Equations:  # P (K, n, V), y (n, V)
        return cls(torch.einsum("knv,jnv->vkj", P, P), torch.einsum("knv,nv->vk", P, y), (y * y).sum(0))

    @classmethod
    def cat(cls, parts: list[_Equations]) -> _Equations:  # vertex blocks -> all vertices
        return cls(*(torch.cat([getattr(p, x) for p in parts]) for x in ("G", "b", "yy")))

    def __sub__(self, other: _Equations) -> _Equations:
        return _Equations(self.G - other.G, self.b - other.b, self.yy - other.yy)

    def __getitem__(self, cols: slice) -> _Equations:
        return _Equations(self.G[cols], self.b[cols], self.yy[cols])

    def pooled(self) -> torch.Tensor:
        """(1, K): one weighting for every vertex, each vertex's equations scaled by its energy."""
        scale = 1 / self.yy.clamp_min(1e-12)
        G, b = (self.G * scale[:, None, None]).sum(0, keepdim=True), (self.b * scale[:, None]).sum(0, keepdim=True)
        return _nnls(G, b)

    def solve(self, shrink: float, pooled: torch.Tensor) -> torch.Tensor:
        """(V, K) non-negative weights pulled toward `pooled` with strength `shrink` (0: each vertex
        alone; inf: the pooled weights everywhere)."""
        if math.isinf(shrink):
            return pooled.expand(len(self.G), -1).clone()
        k = self.G.shape[1]
        ridge = (shrink * self.G.diagonal(dim1=1, dim2=2).mean(1) + 1e-9 * self.yy)[:, None]
        return _nnls(self.G + ridge[:, :, None] * torch.eye(k, dtype=self.G.dtype), self.b + ridge * pooled)


def stack_weights(
    preds: list[np.ndarray], target: np.ndarray, folds: np.ndarray, block: int = 4096
) -> tuple[np.ndarray, dict]:
    """Stacking: non-negative least-squares weights per vertex over the members' validation
    predictions `preds` (K arrays (n, V)) for `target` (n, V), shrunk toward the subject's pooled
    weights by the strength whose cross-fitted predictions (weights fitted without the fold's rows,
    one fold id per row in `folds`) score best. A member stands alone where it cross-fits better
    than every stack: on these honest estimates the combination does not lose to a member.
    Vertices go in blocks of `block`. Returns (K, V) weights and {"choice", "val_r2" (cross-fitted
    mean R² of the choice), "val_r2_runs"}."""
    k, v = len(preds), target.shape[1]
    fold_ids = np.unique(folds)
    blocks = [slice(i, min(i + block, v)) for i in range(0, v, block)]

    def block_data(cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
        P = torch.stack([torch.from_numpy(np.asarray(p[:, cols], dtype=np.float64)) for p in preds])
        return P, torch.from_numpy(np.asarray(target[:, cols], dtype=np.float64))

    parts = []  # per block: equations of all rows and of each fold's rows
    for cols in blocks:
        P, y = block_data(cols)
        parts.append((_Equations.of(P, y), [_Equations.of(P[:, folds == f], y[folds == f]) for f in fold_ids]))
    total = _Equations.cat([a for a, _ in parts])
    held = [_Equations.cat([h[i] for _, h in parts]) for i in range(len(fold_ids))]
    pooled = [(total - h).pooled() for h in held]

    sse = {s: torch.zeros(v, dtype=torch.float64) for s in SHRINKS}
    sse_runs = torch.zeros(k, v, dtype=torch.float64)
    ss = torch.zeros(v, dtype=torch.float64)
    for cols in blocks:
        P, y = block_data(cols)
        ss[cols] = ((y - y.mean(0)) ** 2).sum(0)
        sse_runs[:, cols] = ((P - y) ** 2).sum(1)
        for i, f in enumerate(fold_ids):
            rows = torch.from_numpy(folds == f)
            train = (total - held[i])[cols]
            for s in SHRINKS:
                w = train.solve(s, pooled[i])
                sse[s][cols] += ((torch.einsum("vk,knv->nv", w, P[:, rows]) - y[rows]) ** 2).sum(0)
    ss = ss.clamp_min(1e-12)
    scores = {f"stack shrink={s:g}": float((1 - e / ss).mean()) for s, e in sse.items()}
    runs = [float((1 - e / ss).mean()) for e in sse_runs]
    scores.update({f"run {j + 1}": r for j, r in enumerate(runs)})
    choice = max(scores, key=scores.get)
    if choice.startswith("run "):
        w = torch.zeros(v, k, dtype=torch.float64)
        w[:, int(choice[4:]) - 1] = 1
    else:
        w = total.solve(float(choice.split("=")[1]), total.pooled())
    return w.T.numpy(), {"choice": choice, "val_r2": scores[choice], "val_r2_runs": runs}


def stack_folds(keys: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """A fold id per validation row, by image (repeats of an image share a fold), k folds at most."""
    images, inverse = np.unique(keys, return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(images))
    return (order % min(k, len(images)))[inverse]


def _run_file(run: Path, name: str) -> Path | None:
    """A file of the run: in the trial folder it stands for, or in the run (sweep) folder above."""
    for folder in (resolve_run(run), Path(run)):
        if (folder / name).is_file():
            return folder / name
    return None


def selection_weights(r: np.ndarray, mode: str) -> np.ndarray:
    """(runs, vertices) one-hot weights from validation r of each run: per vertex or per subject."""
    if mode not in ("vertex", "subject"):
        raise ConfigError(f"--select {mode!r}: expected one of {', '.join(SELECT_MODES)}")
    r = np.nan_to_num(np.asarray(r, dtype=np.float64), nan=0.0)  # a vertex with no score: r = 0
    best = r.argmax(0) if mode == "vertex" else np.full(r.shape[1], r.mean(1).argmax())
    return (np.arange(len(r))[:, None] == best[None, :]).astype(np.float64)


def predict_selected(
    runs: list[Path | str],
    data_root: Path | str,
    out: Path | str,
    select: str = "stack",  # measured best on pretrained and random-init caches (docs/benchmarks.md)
    subjects: str = "all",
    progress: bool = True,
    **predict_kwargs,
) -> dict:
    """Predict the test rows with every run, then combine them per vertex by `select`.
    Writes the predictions, `selection.json` (per subject: each run's mean weight, and the
    validation score of each run and of the combination) and `selection.safetensors`
    (`<subject>.weights`, runs x vertices). Returns scores where test responses exist, and the
    selection summary under "selection"."""
    runs = [Path(r) for r in runs]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # each member's predict would share the subjects out
        raise ConfigError("--select: combining runs is one process's work; run it without torchrun")
    if len(runs) < 2:
        raise ConfigError("--select needs two runs or more")
    if select not in SELECT_MODES:
        raise ConfigError(f"--select {select!r}: expected one of {', '.join(SELECT_MODES)}")
    if select == "stack" and len(runs) > MAX_STACK:
        raise ConfigError(f"--select stack combines at most {MAX_STACK} runs ({len(runs)} given); use --select vertex")
    needed = ("split.json", "val_vertex.safetensors") + ((VAL_PRED_FILE,) if select == "stack" else ())
    splits, vertex, val_preds = [], [], []
    for run in runs:
        files = [_run_file(run, f) for f in needed]
        if None in files:
            missing = needed[files.index(None)]
            if (run.parent / "sweep.json").is_file():
                raise ConfigError(
                    f"{run}: a trial of the sweep {run.parent}, whose validation results are its best trial's "
                    f"only: combine the sweep folder {run.parent} (its best trial), or refit this trial's config alone"
                )
            raise ConfigError(
                f"{run}: no {missing} (validation results): --select {select} needs runs validated by this "
                "version of blobenc" + ("; or choose --select vertex" if missing == VAL_PRED_FILE else "")
            )
        splits.append(ValidationSplit.load(files[0]))
        vertex.append(load_file(files[1]))
        val_preds.append(files[2] if select == "stack" else None)
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
        with PredictionStaging(out, dataset) as staging:
            for name in names:
                r = np.stack([v[f"{name}.r"].numpy() for v in vertex])
                if select == "stack":
                    w, val = _stack_subject(dataset, splits[0], name, val_preds)
                else:
                    w = selection_weights(r, select)
                    val = {"metric": "mean r", "runs": [float(np.nanmean(x)) for x in r]}
                    val["selected"] = float(np.nanmean((w * np.nan_to_num(r)).sum(0)))
                preds = [dataset.read_predictions(work / str(k), name, "test") for k in range(len(runs))]
                combined = sum(p * wk[None, :] for p, wk in zip(preds, w.astype(np.float32), strict=True))
                dataset.write_predictions(staging.path, name, combined.astype(np.float32), "test")
                weights[f"{name}.weights"] = torch.from_numpy(w.astype(np.float32))
                summary[name] = {"share": [float(s) for s in w.mean(1)], "val": val}
                if dataset.subjects[name].has_responses("test"):
                    scores[name] = score_subject(dataset.subjects[name], combined, "test")
            result = {"select": select, "runs": [str(r) for r in runs], "subjects": summary}
            write_json(staging.path / "selection.json", result)
            save_weights(staging.path / "selection.safetensors", weights, {"runs": json.dumps(result["runs"])})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"scores": scores, "selection": result}


def _stack_subject(dataset, split: ValidationSplit, name: str, val_pred_files: list[Path]) -> tuple[np.ndarray, dict]:
    """Stacking weights (runs, targets) of one subject from the runs' validation predictions."""
    subject = dataset.subjects[name]
    val_rows = split.rows(subject)[1]
    target = subject.responses("train", val_rows)
    preds = []
    for path in val_pred_files:
        with safe_open(str(path), framework="pt") as f:
            p = f.get_tensor(name).float().numpy()
        if p.shape != target.shape:
            raise ConfigError(
                f"{path}: {name}'s validation predictions are {p.shape}, the split's responses {target.shape}; "
                "the run was not validated on this dataset"
            )
        preds.append(p)
    keys = np.asarray([subject.keys["train"][i] for i in val_rows.tolist()])
    w, info = stack_weights(preds, target, stack_folds(keys))
    return w, {"metric": "mean R² (cross-fitted)", "runs": info["val_r2_runs"], "selected": info["val_r2"],
               "choice": info["choice"]}  # fmt: skip
