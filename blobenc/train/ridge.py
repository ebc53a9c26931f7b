"""`blobenc fit-ridge`: per-subject (banded) ridge on cached features, validated on fit-head's split
(docs/fit-ridge.md). The math lives in blobenc/ridge.py; this module feeds it and writes the run."""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from blobenc.data import open_dataset
from blobenc.data.base import dataset_id
from blobenc.distributed import barrier, gather_objects, init_from_env, is_main, my_share, rank, world_size
from blobenc.errors import CacheError, ConfigError
from blobenc.features.cache import FeatureCache
from blobenc.files import write_json
from blobenc.plan import BASELINE, MemoryPlan, available_memory
from blobenc.profile import timed
from blobenc.progress import track
from blobenc.ridge import (
    LayerScaler,
    banded_ridge,
    check_alphas,
    check_features,
    default_alphas,
    loo_ridge,
    reduce_layer,
    reduced_dim,
    set_ridge_backend,
)
from blobenc.runtime import resolve_device
from blobenc.scoring import validation_scores
from blobenc.train.checkpoint import ModelSpec, RunSpec, save_weights
from blobenc.train.data import SplitTargets
from blobenc.train.runfolder import RunFolder
from blobenc.train.validation import save_validation

logger = logging.getLogger(__name__)

# Beyond this many bytes of primal weights per subject (d x V float32) a kernel solution stays dual.
PRIMAL_LIMIT = 2 << 30


@dataclass(frozen=True)
class RidgeConfig:
    features: str = "mean"
    layers: tuple[str, ...] | None = None  # globs over the cache's layers; None = all of them
    alphas: tuple[float, ...] | None = None  # None: default_alphas scaled to each kernel's trace
    banded: bool = False
    n_iter: int = 20  # banded: random-search draws of layer weightings
    cv: int = 5  # banded: folds by image
    val_fraction: float = 0.1
    seed: int = 0
    refit: bool = True
    device: str = "auto"

    def check(self) -> None:
        check_features(self.features)
        if self.alphas is not None:
            check_alphas(self.alphas)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction {self.val_fraction}: expected a fraction in (0, 1)")
        if self.n_iter < 1 or self.cv < 2:
            raise ConfigError(f"--n-iter {self.n_iter} / --cv {self.cv}: expected n_iter >= 1 and cv >= 2")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class LayerFeatures:
    """Reduced features (float32, one row per cache row) of the layers a ridge uses: the rows of
    every subject read once by whole chunks when they fit `max_memory`, else read from the cache
    on each request (a layer at a time, so all tokens of all layers are never in RAM at once)."""

    def __init__(self, cache: FeatureCache, layers: list[str], mode: str, rows: np.ndarray, max_memory: int | None):
        self.cache, self.layers, self.mode = cache, layers, mode
        self.prefix = int(cache.attrs.get("num_prefix_tokens") or 0)
        shapes = cache.attrs["layer_shapes"]
        self.dims = [reduced_dim(mode, shapes[n], self.prefix) for n in layers]
        self.nbytes = len(rows) * sum(self.dims) * 4
        self.rows = np.asarray(rows)
        self.tables: list[torch.Tensor] | None = None
        if max_memory is None or self.nbytes <= max_memory:
            self.tables = [self._read(n, self.rows) for n in layers]

    @timed("read features")
    def _read(self, layer: str, rows: np.ndarray) -> torch.Tensor:
        out = torch.empty(len(rows), self.dims[self.layers.index(layer)])
        for positions, block in self.cache.read_rows(layer, rows, view=0):
            out[positions] = reduce_layer(block, self.mode, self.prefix, layer)
        return out

    def get(self, i: int, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), d_i) features of layer i at these cache rows."""
        if self.tables is not None:
            return self.tables[i][torch.as_tensor(np.searchsorted(self.rows, rows))]
        return self._read(self.layers[i], rows)


@dataclass
class SubjectFit:
    form: str  # primal | dual
    solver: str  # primal | kernel | banded
    scalers: list[LayerScaler]
    y_mean: torch.Tensor
    alpha: torch.Tensor  # (V,) effective alpha per target
    coef: list[torch.Tensor] | torch.Tensor  # primal: per layer (d_l, V); dual: (n, V)
    kernel_weights: torch.Tensor  # (n_layers, V): per-target weight of each layer's Z Z^T / d
    train_rows: np.ndarray | None = None  # dual: cache row of each training image

    @property
    def layer_weights(self) -> torch.Tensor:
        """(V, n_layers): each layer's share of the kernel per target (banded ridge's layer preference)."""
        w = self.kernel_weights
        return (w / w.sum(0, keepdim=True)).T.contiguous()


@timed("solve")
def _solve(
    feats: LayerFeatures,
    rows: np.ndarray,
    Y: torch.Tensor,
    config: RidgeConfig,
    device: torch.device,
    val_rows: np.ndarray | None = None,
    keep: bool = True,
) -> tuple[SubjectFit, torch.Tensor | None]:
    """Fit one subject: `rows` are the cache rows of its training responses Y (one per row, repeats
    allowed). Returns the fit and its predictions at `val_rows`. Layers are read one at a time.
    `keep=False`: the fit only validates (a refit replaces it), so a kernel solution stays dual."""
    n, n_layers = len(rows), len(feats.layers)
    y_mean = Y.mean(0)
    Yc = Y - y_mean
    scalers = []

    def layer(i: int, at: np.ndarray) -> torch.Tensor:
        return scalers[i](feats.get(i, at).to(device))

    for i in range(n_layers):
        scalers.append(LayerScaler.fit(feats.get(i, rows).to(device)))
    primal = sum(feats.dims) < n and not config.banded
    if primal:
        X = torch.cat([layer(i, rows) * scalers[i].weight ** 0.5 for i in range(n_layers)], 1)
        alphas = check_alphas(config.alphas) if config.alphas else default_alphas(float((X * X).sum()))
        res = loo_ridge(X, None, Yc, alphas)
        del X
        splits = np.cumsum(feats.dims)[:-1].tolist()
        coef = [c * s.weight**0.5 for c, s in zip(torch.tensor_split(res.coef, splits), scalers, strict=True)]
        fit = SubjectFit("primal", "primal", scalers, y_mean, res.best_alpha, coef, _uniform(scalers, Y))
        return fit, None if val_rows is None else predict_features(fit, _raw(feats, val_rows), feats, device)

    kernels = torch.zeros((n_layers if config.banded else 1), n, n, device=device)
    val_kernels = None if val_rows is None else torch.zeros(len(kernels), len(val_rows), n, device=device)
    for i in range(n_layers):
        z = layer(i, rows)
        j = i if config.banded else 0
        kernels[j] += z @ z.T * scalers[i].weight
        if val_kernels is not None:
            val_kernels[j] += layer(i, val_rows) @ z.T * scalers[i].weight
        del z
    alphas = check_alphas(config.alphas) if config.alphas else default_alphas(float(kernels.sum(0).trace()))
    if config.banded:
        dual, weights = banded_ridge(
            kernels, Yc, alphas, image_folds(rows, config.cv, config.seed), config.n_iter, config.seed
        )
        alpha, solver = 1 / weights.sum(0), "banded"
    else:
        res = loo_ridge(None, kernels[0], Yc, alphas)
        dual, alpha, weights, solver = res.coef, res.best_alpha, _uniform(scalers, Y), "kernel"
    del kernels
    val = None
    if val_kernels is not None:
        val = y_mean + sum((k @ dual) * (weights[j] if config.banded else 1) for j, k in enumerate(val_kernels))
    fit = SubjectFit("dual", solver, scalers, y_mean, alpha, dual, weights, train_rows=rows)
    if (
        keep and sum(feats.dims) * Y.shape[1] * 4 <= PRIMAL_LIMIT
    ):  # the same predictor as W_l = w_l Z_l^T (dual * weight_l)
        fit.coef = [layer(i, rows).T @ (dual * weights[i]) * scalers[i].weight for i in range(n_layers)]
        fit.form, fit.train_rows = "primal", None
    return fit, val


def _raw(feats: LayerFeatures, rows: np.ndarray) -> list[torch.Tensor]:
    return [feats.get(i, rows) for i in range(len(feats.layers))]


def _uniform(scalers: list[LayerScaler], Y: torch.Tensor) -> torch.Tensor:
    return torch.ones(len(scalers), Y.shape[1], device=Y.device)


def image_folds(rows: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds over response rows that keep every image's rows in one fold (repeats never leak)."""
    images = np.unique(rows)
    if len(images) < k:
        raise ConfigError(f"--cv {k}: the subject has only {len(images)} training images")
    fold_of = dict(zip(images.tolist(), np.random.default_rng(seed).permutation(len(images)) % k, strict=True))
    fold = np.asarray([fold_of[i] for i in rows.tolist()])
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def predict_features(fit: SubjectFit, raw: list[torch.Tensor], feats, device: torch.device) -> torch.Tensor:
    """Predictions from reduced (not yet z-scored) features per layer; a dual fit also reads its
    training images' features from `feats` (anything with get(i, rows))."""
    out = fit.y_mean.expand(len(raw[0]), -1).clone()
    for i, (x, scaler) in enumerate(zip(raw, fit.scalers, strict=True)):
        z = scaler(x.to(device))
        if fit.form == "primal":
            out += z @ fit.coef[i]
        else:
            zt = scaler(feats.get(i, fit.train_rows).to(device))
            out += ((z @ zt.T) * scaler.weight) @ fit.coef * fit.kernel_weights[i]
    return out


def ridge_plan(dims: list[int], n_images: int, sizes: dict[str, tuple[int, int]], n_val: int, n_group: int,
               config: RidgeConfig) -> MemoryPlan:  # fmt: skip
    """fit-ridge's memory from the shapes: reduced features in memory (float32) and the validation
    predictions and targets (group space) throughout; per subject its responses (float32, centred
    copy, the refit's), the decomposition (float64), one block of 4,096 targets' float64 work and
    two subjects' worth of coefficients (the validated fit and the refit)."""
    d = sum(dims)
    n = max(n for n, _ in sizes.values())
    v = max(v for _, v in sizes.values())
    kernel = not (d < n and not config.banded)
    r = min(n, d)
    solve = {
        "responses": 3 * n * v * 4,
        "decomposition": (3 * n * n * 8 + len(dims) * n * n * 4) if kernel else (2 * n * r * 8 + 2 * d * d * 8),
        "target blocks": 4 * n * 4096 * 8,
        "coefficients": 2 * (d + (n if kernel else 0)) * v * 4,
    }
    return MemoryPlan(
        "fit-ridge",
        {"baseline": BASELINE, "features": n_images * d * 4, "validation": n_val * n_group * 13},
        {"solve (largest subject)": solve},
    )


def fit_ridge(
    cache_path: Path | str,
    data_root: Path | str,
    out: Path | str,
    config: RidgeConfig = RidgeConfig(),
    *,
    max_memory: int | None = None,
    feature_memory: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Fit one ridge per subject on the cache, validate on fit-head's by-image split (same seed,
    same images), refit on every training image, and write the run folder; returns the summary.
    `max_memory` (bytes; None: the memory available): the plan (ridge_plan) is logged and refused
    beyond it. `feature_memory` (bytes; None: what the plan leaves): reduced features beyond it are
    read from the cache a layer at a time.

    Under torchrun the subjects are shared over the ranks (each rank solves its own, with the same
    numbers as alone) and rank 0 writes the run; other ranks return None.

    The run is written beside `out` and renamed into place when complete; `overwrite` replaces
    what `out` holds then, not before (an error part-way leaves it as it was)."""
    config.check()
    out = Path(out)
    if RunFolder(out).state() in ("unfinished", "finished") and not overwrite:
        raise ConfigError(f"--out {out}: holds a run; --overwrite replaces it, or choose a new --out")
    device = resolve_device(config.device)
    init_from_env(device)
    set_ridge_backend(device)
    cache = FeatureCache.open(cache_path)
    dataset = open_dataset(data_root)
    layers = _select_layers(cache, config.layers)
    split = dataset.validation_split(config.val_fraction, config.seed)
    data = SplitTargets(dataset, split, torch.device("cpu"))
    try:
        rows = {part: cache.rows(list(s.key)) for part, s in data.sets.items()}
    except CacheError as e:
        raise CacheError(f"{e}: the cache was not extracted from this dataset ({dataset.root})") from None
    img_rows = np.unique(np.concatenate(list(rows.values())))
    shapes = cache.attrs["layer_shapes"]
    prefix = int(cache.attrs.get("num_prefix_tokens") or 0)
    dims = [reduced_dim(config.features, shapes[n], prefix) for n in layers]
    sizes = {  # the refit's rows: training and validation images
        name: (int((data.sets["train"].subject == i).sum() + (data.sets["val"].subject == i).sum()),
               len(data.group_index[name]))
        for i, name in enumerate(data.subjects)
    }  # fmt: skip
    plan = ridge_plan(dims, len(img_rows), sizes, len(data.sets["val"]), data.group.n_vertices, config)
    budget = available_memory() if max_memory is None else max_memory
    if feature_memory is None:  # layers are read per use when the rest of the plan leaves too little
        feature_memory = budget - plan.without("features")
        if plan.resident["features"] > feature_memory:
            plan.resident["features"] = 0
    solver = "banded" if config.banded else ("primal" if sum(dims) < max(n for n, _ in sizes.values()) else "kernel")
    plan.check(budget, "use --features mean (or a smaller pool=N) or fewer --layers, or a machine with more memory")
    logger.info("%s; %s ridge on %d features", plan.describe(), solver, sum(dims))
    feats = LayerFeatures(cache, layers, config.features, img_rows, max(feature_memory, 0))

    t0 = time.perf_counter()
    val_pred = np.zeros_like(data.val_target)
    records = []
    tmp = out.parent / f".{out.name}.tmp"  # renamed to `out` once complete: never a half-written run
    staging = RunFolder(tmp)
    if is_main():  # locked: a second fit-ridge into the same --out is refused, not interleaved
        staging.claim(clear=True)  # what a killed run left
    barrier()
    try:
        mine = my_share(list(enumerate(data.subjects)))
        for i, name in track(mine, "fit-ridge", progress, len(mine)):
            ts = time.perf_counter()
            subject = dataset.subjects[name]
            part_rows = {p: dict(data.sets[p].rows)[i] for p in ("train", "val")}
            tr = np.flatnonzero(data.sets["train"].subject == i)
            va = np.flatnonzero(data.sets["val"].subject == i)
            Y = torch.as_tensor(subject.responses("train", part_rows["train"]), device=device)
            fit, pred = _solve(
                feats, rows["train"][tr], Y, config, device, val_rows=rows["val"][va], keep=not config.refit
            )
            val_pred[np.ix_(va, data.group_index[name])] = pred.cpu().numpy()
            if config.refit:  # every training image, validation ones included: the model predict uses
                all_rows = np.sort(np.concatenate([part_rows["train"], part_rows["val"]]))
                Y = torch.as_tensor(subject.responses("train", all_rows), device=device)
                fit, _ = _solve(
                    feats, cache.rows([subject.keys["train"][r] for r in all_rows.tolist()]), Y, config, device
                )
            _save_fit(
                tmp / "weights" / f"{name}.safetensors", fit, layers, cache
            )  # one subject's weights in RAM at a time
            records.append(
                {
                    "subject": name,
                    "solver": fit.solver,
                    "form": fit.form,
                    "features": config.features,
                    "alpha_median": float(fit.alpha.median()),
                    "n_train": len(tr),
                    "seconds": time.perf_counter() - ts,
                    "rank": rank(),  # the torchrun process that solved it (0 alone)
                }
            )
            del fit, Y
            if not is_main():  # handed to rank 0 through the shared folder: ~150 MB a subject at the NSD
                np.save(tmp / "weights" / f".val-{name}.npy", val_pred[np.ix_(va, data.group_index[name])])
        records = [r for part in gather_objects(records) for r in part]
        if not is_main():
            barrier()  # rank 0 reads the validation predictions, then renames the run
            return None
        if world_size() > 1:
            for i, name in enumerate(data.subjects):
                file = tmp / "weights" / f".val-{name}.npy"
                va = np.flatnonzero(data.sets["val"].subject == i)
                if file.is_file():  # rank 0's own subjects are in val_pred already and have no file
                    val_pred[np.ix_(va, data.group_index[name])] = np.load(file)
                    file.unlink()
        records.sort(key=lambda r: data.subjects.index(r["subject"]))
        val = validation_scores(
            val_pred, data.val_target, data.sets["val"].subject, data.subjects, data.group_index, data.group.n_vertices
        )
        for r in records:
            r["val"] = val["subjects"].get(r["subject"])
        val_rois = save_validation(tmp, val_pred, data, ".")
        seconds = time.perf_counter() - t0

        split.save(tmp / "split.json")
        with (tmp / "metrics.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        ModelSpec(
            kind="ridge",
            head="ridge",
            subjects=data.subjects,
            layers=layers,
            features=cache.feature_spec(),
            cache=str(cache.path),
            group=data.group.to_dict(),
            ridge={"features": config.features, "banded": config.banded, "refit": config.refit},
        ).write(tmp / "model.json")
        summary = {
            "kind": "fit-ridge",
            "best_epoch": None,
            "val": val,
            "val_rois": val_rois,
            "trial": ".",
            "seconds": seconds,
            "subjects": records,
            "trials": [],
        }
        write_json(tmp / "summary.json", summary)
        RunSpec(
            kind="fit-ridge",
            command=shlex.join(sys.argv),
            cache=str(cache_path),
            data=str(data_root),
            configs=[config.to_dict()],
            features=cache.feature_spec().to_dict(),
            dataset=dataset_id(dataset),
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        ).write(tmp / "run.json")
        old = out.parent / f".{out.name}.old"
        if out.exists():  # an empty folder made for us, or the run --overwrite replaces
            out.rename(old)
        tmp.rename(out)
    except BaseException:  # an error or Ctrl-C: no half-written run is left beside --out
        if is_main():
            staging.release()
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    staging.release()
    shutil.rmtree(old, ignore_errors=True)
    barrier()
    return summary


def _select_layers(cache: FeatureCache, patterns: tuple[str, ...] | None) -> list[str]:
    if not patterns:
        return cache.layers
    from blobenc.features.trunk import match_modules  # trunk.py imports timm: not at predict time

    chosen: set[str] = set()
    for p in patterns:
        hit = match_modules(cache.layers, p)
        if not hit:
            raise ConfigError(f"--layers {p!r} matches no layer of the cache; it has {', '.join(cache.layers)}")
        chosen |= set(hit)
    return [n for n in cache.layers if n in chosen]


@timed("write")
def _save_fit(path: Path, fit: SubjectFit, layers: list[str], cache: FeatureCache) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"y_mean": fit.y_mean, "alpha": fit.alpha, "layer_weights": fit.layer_weights}
    for name, s in zip(layers, fit.scalers, strict=True):
        tensors[f"{name}.mean"], tensors[f"{name}.std"] = s.mean, s.std
    if fit.form == "primal":
        for name, c in zip(layers, fit.coef, strict=True):
            tensors[f"{name}.coef"] = c
    else:
        tensors["dual_coef"], tensors["kernel_weights"] = fit.coef, fit.kernel_weights
    meta = {"form": fit.form, "solver": fit.solver, "layers": json.dumps(layers)}
    if fit.train_rows is not None:
        meta["train_keys"] = json.dumps([cache.keys[r] for r in fit.train_rows.tolist()])
    save_weights(path, tensors, meta)


def load_fit(path: Path, cache: FeatureCache | None, device: torch.device) -> tuple[SubjectFit, np.ndarray | None]:
    """A subject's saved fit and, for a dual one, the cache rows of its training images (from
    their keys, so any cache holding those images will do)."""
    from safetensors import safe_open

    from blobenc.train.checkpoint import load_weights

    t = load_weights(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    layers = json.loads(meta["layers"])
    scalers = [LayerScaler(t[f"{n}.mean"].to(device), t[f"{n}.std"].to(device)) for n in layers]
    n_targets = len(t["y_mean"])
    if meta["form"] == "primal":
        coef = [t[f"{n}.coef"].to(device) for n in layers]
        weights = torch.ones(len(layers), n_targets, device=device)
        return SubjectFit("primal", meta["solver"], scalers, t["y_mean"].to(device), t["alpha"], coef, weights), None
    keys = json.loads(meta["train_keys"])
    if cache is None:
        raise CacheError(f"{path}: a dual (kernel) ridge needs its training images' features: give --cache")
    rows = cache.rows(keys)
    fit = SubjectFit(
        "dual",
        meta["solver"],
        scalers,
        t["y_mean"].to(device),
        t["alpha"],
        t["dual_coef"].to(device),
        t["kernel_weights"].to(device),
        train_rows=rows,
    )
    return fit, rows
