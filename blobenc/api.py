"""The Python API: every command of the CLI as a function with the same names and options.

    import blobenc
    blobenc.write_synthetic("data")
    blobenc.extract("data", "cache", model="test_vit", pretrained=False, layers=["blocks.*"])
    blobenc.fit_ridge("cache", "data", "ridge")
    blobenc.fit_head("cache", "data", "head", settings={"epochs": 10})
    encoder = blobenc.load_run("head")
    y = encoder.predict(blobenc.open_dataset("data").subjects["subj01"])   # (test images, vertices)

Options named like the CLI's (`--max-memory 8G` is `max_memory="8G"` or a number of bytes;
`--set lr=1e-3` is `settings={"lr": 1e-3}`; `--sweep lr=1e-3,3e-3` is `sweep={"lr": [1e-3, 3e-3]}`).
Each returns what the command's `--json` writes (a dict), or the object named. Errors are
`blobenc.BlobencError`s, whose message is the CLI's one line. torch, timm and zarr are imported
when a function runs: `import blobenc` stays light.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from blobenc.data import open_dataset
from blobenc.data.base import Dataset
from blobenc.defaults import DEFAULT_LAYERS, DEFAULT_MODEL
from blobenc.errors import ConfigError
from blobenc.plan import parse_bytes
from blobenc.train.config import runtime_overrides

PathLike = Path | str
Size = int | str | None  # bytes, or "512M", "8G"


def _bytes(value: Size, option: str) -> int | None:
    return parse_bytes(value, option) if isinstance(value, str) else value


def _dataset(data: PathLike | Dataset) -> Dataset:
    return data if isinstance(data, Dataset) else open_dataset(data)


def _overrides(settings: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """`key=value` items (the CLI's --set) from a mapping of Python values or such items."""
    if settings is None:
        return []
    if isinstance(settings, Mapping):  # JSON is YAML: each value parses back as itself
        return [f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in settings.items()]
    return list(settings)


def _grid(sweep: Mapping[str, Sequence] | Sequence[str] | None) -> list[str]:
    """`key=v1,v2` items (the CLI's --sweep) from {key: values} (a "lo:hi" string for --search ranges)."""
    if sweep is None:
        return []
    if isinstance(sweep, Mapping):
        return [f"{k}={v if isinstance(v, str) else ','.join(json.dumps(x) for x in v)}" for k, v in sweep.items()]
    return list(sweep)


def extract(
    data: PathLike | Dataset | None = None,
    out: PathLike = "cache",
    *,
    images: PathLike | None = None,
    model: str = DEFAULT_MODEL,
    layers: Sequence[str] | None = None,
    pretrained: bool = True,
    weights: PathLike | None = None,
    seed: int = 0,
    store_dtype: str = "float16",
    pool: int | None = None,
    views: int = 1,
    crop_scale: float = 0.8,
    batch_size: int = 32,
    workers: int | None = None,
    chunk_images: int | None = None,
    shard: str | tuple[int, int] | None = None,
    overwrite: bool = False,
    device: str = "auto",
    precision: str = "auto",
    max_memory: Size = None,
    progress: bool = True,
) -> dict:
    """Run a timm trunk once over every unique image of `data` (a dataset root or Dataset), or over
    `images` (any folder), and cache `layers` (globs over module names) in the Zarr store `out`;
    resumable. Returns this run's summary with the cache's `info`."""
    from blobenc.features.cache import FeatureCache
    from blobenc.features.extract import ExtractConfig, parse_shard
    from blobenc.features.extract import extract as run_extract
    from blobenc.features.images import list_images
    from blobenc.features.trunk import TrunkSpec

    if (data is None) == (images is None):
        raise ConfigError("give either DATA (a dataset root) or --images DIR, not both or neither")
    if images is not None:
        keys, paths = list_images(Path(images))
    else:
        index = _dataset(data).unique_images()
        keys, paths = index.keys, list(index.paths)
    config = ExtractConfig(
        trunk=TrunkSpec(model, pretrained, str(weights) if weights else None, seed),
        layers=tuple(layers or DEFAULT_LAYERS),
        store_dtype=store_dtype,
        pool=pool,
        views=views,
        crop_scale=crop_scale,
        batch_size=batch_size,
        num_workers=workers,
        chunk_images=chunk_images,
        device=device,
        precision=precision,
    )
    summary = run_extract(
        keys,
        paths,
        out,
        config,
        shard=shard if isinstance(shard, tuple) else parse_shard(shard),
        overwrite=overwrite,
        progress=progress,
        max_memory=_bytes(max_memory, "--max-memory"),
    )
    return summary | {"info": FeatureCache.open(out, allow_incomplete=True).info()}


def fit_ridge(
    cache: PathLike,
    data: PathLike,
    out: PathLike,
    *,
    features: str = "mean",
    layers: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    banded: bool = False,
    n_iter: int = 20,
    cv: int = 5,
    val_fraction: float = 0.1,
    seed: int = 0,
    refit: bool = True,
    max_memory: Size = None,
    feature_memory: Size = None,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> dict | None:
    """Fit a (banded) ridge per subject on cached features, alphas by leave-one-out (banded: by
    cross-validation of layer weightings); the baseline every head must beat. Returns the run's
    summary (None on torchrun ranks other than 0)."""
    from blobenc.train.ridge import RidgeConfig
    from blobenc.train.ridge import fit_ridge as run_fit_ridge

    config = RidgeConfig(
        features=features,
        layers=tuple(layers) if layers else None,
        alphas=tuple(float(a) for a in alphas) if alphas else None,
        banded=banded,
        n_iter=n_iter,
        cv=cv,
        val_fraction=val_fraction,
        seed=seed,
        refit=refit,
        device=device,
    )
    return run_fit_ridge(
        cache,
        data,
        out,
        config,
        max_memory=_bytes(max_memory, "--max-memory"),
        feature_memory=_bytes(feature_memory, "--feature-memory"),
        progress=progress,
        overwrite=overwrite,
    )


def compare(
    caches: Sequence[PathLike],
    data: PathLike,
    out: PathLike,
    *,
    features: str = "mean",
    layers: Sequence[str] | None = None,
    alphas: Sequence[float] | None = None,
    all_layers: bool = True,
    partition: Sequence[str] | None = None,
    n_iter: int = 20,
    cv: int = 5,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard: str | tuple[int, int] | None = None,
    max_memory: Size = None,
    device: str = "auto",
    progress: bool = True,
) -> dict | None:
    """Score every layer of every cache (and each cache's layers together) per subject, target and
    ROI with fit-ridge's leave-one-out ridge; with `partition=("A", "B")` (cache labels, or
    "LABEL:GLOB" layer groups) also the variance partition of the two feature sets. Writes the
    comparison folder `out` (resumable; docs/compare.md) and returns its summary (None from a
    shard or torchrun rank that leaves the tables to another). `shard`: "i/n" or (i, n)."""
    from blobenc.compare import CompareConfig, parse_shard
    from blobenc.compare import compare as run_compare

    config = CompareConfig(
        features=features,
        layers=tuple(layers) if layers else None,
        alphas=tuple(float(a) for a in alphas) if alphas else None,
        all_layers=all_layers,
        partition=tuple(partition) if partition else None,
        n_iter=n_iter,
        cv=cv,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    return run_compare(
        [Path(c) for c in caches],
        data,
        out,
        config,
        shard=parse_shard(shard) if isinstance(shard, str) else shard,
        max_memory=_bytes(max_memory, "--max-memory"),
        progress=progress,
    )


def fit_head(
    cache: PathLike,
    data: PathLike,
    out: PathLike,
    *,
    config: PathLike | None = None,
    settings: Mapping[str, Any] | Sequence[str] | None = None,
    sweep: Mapping[str, Sequence] | Sequence[str] | None = None,
    search: int | None = None,
    halving: bool = False,
    ensemble: int | None = None,
    pca: PathLike | None = None,
    pca_components: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_minutes: float = 10.0,
    max_memory: Size = None,
    feature_memory: Size = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    callbacks: Sequence = (),
) -> dict | None:
    """Fit the group PCA and train the multi-subject head (phase 1) from a feature cache: one config
    (`config` YAML, then `settings`), a grid (`sweep`) or `search` quasi-random draws over the sweep's
    keys, trained in one pass (with `halving`, the worse half stops at each rung); `ensemble` K heads
    averaged; `callbacks` (blobenc.train.trainer.Callback) see every step and validation. Returns
    the run's summary (None on torchrun ranks other than 0)."""
    from blobenc.train.config import load_config, search_configs, sweep_configs
    from blobenc.train.fit import fit_head as run_fit_head

    overrides = [*_overrides(settings), *runtime_overrides(device, precision)]
    if pca_components is not None:
        overrides.append(f"proj_dim={pca_components}")
    base = load_config(Path(config) if config else None, overrides)
    grid = _grid(sweep)
    if search:
        configs, _ = search_configs(base, grid, search)
    else:
        configs = sweep_configs(base, grid) if grid else [base]
    return run_fit_head(
        cache,
        data,
        out,
        configs,
        pca_path=pca,
        resume=resume,
        overwrite=overwrite,
        max_memory=_bytes(max_memory, "--max-memory"),
        feature_memory=_bytes(feature_memory, "--feature-memory"),
        checkpoint_minutes=checkpoint_minutes,
        halving=2 if halving else None,
        ensemble=ensemble,
        progress=progress,
        callbacks=callbacks,
    )


def finetune(
    run: PathLike,
    data: PathLike,
    out: PathLike,
    *,
    config: PathLike | None = None,
    settings: Mapping[str, Any] | Sequence[str] | None = None,
    unfreeze: Sequence[str] | None = None,
    freeze: Sequence[str] | None = None,
    grad_checkpointing: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_minutes: float = 10.0,
    max_memory: Size = None,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    callbacks: Sequence = (),
) -> dict | None:
    """Fine-tune a fit-head run's trunk (its attention blocks by default) and head end to end on
    streamed, augmented images (phase 2); `callbacks` as fit_head's. Returns the run's summary
    (None on other torchrun ranks)."""
    from blobenc.train.config import FinetuneConfig, load_config
    from blobenc.train.finetune import finetune as run_finetune

    overrides = [*_overrides(settings), *runtime_overrides(device, precision)]
    if unfreeze:
        overrides.append(f"unfreeze={json.dumps(list(unfreeze))}")
    if freeze:
        overrides.append(f"freeze={json.dumps(list(freeze))}")
    if grad_checkpointing:
        overrides.append("grad_checkpointing=true")
    cfg = load_config(Path(config) if config else None, overrides, cls=FinetuneConfig)
    return run_finetune(
        run,
        data,
        out,
        cfg,
        resume=resume,
        overwrite=overwrite,
        checkpoint_minutes=checkpoint_minutes,
        progress=progress,
        max_memory=_bytes(max_memory, "--max-memory"),
        callbacks=callbacks,
    )


def predict(
    runs: PathLike | Sequence[PathLike],
    data: PathLike,
    out: PathLike,
    *,
    subject: str = "all",
    split: str = "test",
    cache: PathLike | None = None,
    images: PathLike | None = None,
    batch_size: int = 64,
    block_images: int = 2048,
    max_memory: Size = None,
    device: str = "auto",
    precision: str = "auto",
    select: str | None = None,
    progress: bool = True,
) -> dict | None:
    """Write subjects' predictions in their own target space into `out`, from one run, or from
    several combined (`select`: stack, the default with several runs; vertex; subject). Returns
    the scores where test responses exist ({} when none; None on other torchrun ranks); with
    several runs, {"scores", "selection"}."""
    from blobenc.predictions import predict as run_predict
    from blobenc.select import predict_selected

    runs = [runs] if isinstance(runs, str | Path) else list(runs)
    if len(runs) > 1 or select is not None:
        if split != "test" or images is not None or cache is not None:
            raise ConfigError(
                "--select predicts the test split from each run's own cache (no --split/--images/--cache)"
            )
        return predict_selected(
            runs,
            data,
            out,
            select or "stack",
            subject,
            progress=progress,
            batch_size=batch_size,
            device=device,
            precision=precision,
            max_memory=_bytes(max_memory, "--max-memory"),
            block_images=block_images,
        )
    return run_predict(
        runs[0],
        data,
        out,
        subject,
        split,
        cache,
        batch_size,
        device,
        precision,
        images=images,
        progress=progress,
        max_memory=_bytes(max_memory, "--max-memory"),
        block_images=block_images,
    )


def evaluate(pred: PathLike, data: PathLike | Dataset, split: str = "test") -> dict:
    """Score the predictions in `pred` against the data's responses: the Algonauts 2023 devkit's
    noise-normalized accuracy where noise ceilings exist, Pearson r and R² always."""
    from blobenc.predictions import evaluate as run_evaluate

    return run_evaluate(pred, _dataset(data), split)


def submit(pred: PathLike, data: PathLike | Dataset, out: PathLike) -> Path:
    """Check every subject's test predictions and zip them in the challenge layout; the zip's path."""
    from blobenc.predictions import submit as run_submit

    return run_submit(pred, _dataset(data), out)


def report(
    runs: PathLike | Sequence[PathLike],
    out: PathLike,
    data: PathLike | None = None,
    predictions: Sequence[PathLike | None] | None = None,
    *,
    title: str | None = None,
    subject_maps: bool = True,
) -> Path:
    """Write one self-contained HTML page of runs (curves, tables, histograms, fsaverage maps);
    its path. Needs the `report` extra."""
    from blobenc.reporting import write_report

    runs = [runs] if isinstance(runs, str | Path) else list(runs)
    return write_report(runs, out, data, predictions, title=title, subject_maps=subject_maps)


def plot_map(
    values,
    subject: str,
    data: PathLike | Dataset,
    *,
    label: str = "",
    cmap: str = "inferno",
    vmin: float | None = None,
    vmax: float | None = None,
):
    """A subject's per-target `values` (its own target order, e.g. test r) on fsaverage: inflated
    views and flat patches of both hemispheres, as the report draws them. A matplotlib Figure (a
    notebook shows it inline). Needs the `report` extra and a dataset on the fsaverage surface."""
    import numpy as np

    from blobenc.reporting import require_extra

    require_extra()
    from blobenc.reporting.figures import surface_figure
    from blobenc.reporting.scores import fsaverage_maps

    dataset = _dataset(data)
    if subject not in dataset.subjects:
        raise ConfigError(f"subject {subject!r}: not in {dataset.root}")
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (dataset.subjects[subject].n_targets,):
        raise ConfigError(
            f"values of shape {values.shape}: {subject} has {dataset.subjects[subject].n_targets} targets"
        )
    maps = fsaverage_maps(dataset, {subject: values})
    if subject not in maps:
        raise ConfigError(f"{dataset.root}: its targets are not fsaverage vertices; there is no map to draw")
    finite = values[np.isfinite(values)]
    lo, hi = np.percentile(finite, [2, 98]) if len(finite) else (0.0, 1.0)
    return surface_figure(
        maps[subject], label=label, cmap=cmap, vmin=lo if vmin is None else vmin, vmax=hi if vmax is None else vmax
    )
