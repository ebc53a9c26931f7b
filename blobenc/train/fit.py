"""`blobenc fit-head`: group PCA plus one or many heads trained from the cache in one pass (docs/fit-head.md)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from blobenc.data import open_dataset
from blobenc.data.base import ValidationSplit, dataset_id, group_regions
from blobenc.distributed import all_agree
from blobenc.errors import ConfigError
from blobenc.features.cache import FeatureCache
from blobenc.files import write_json
from blobenc.heads import create_head, head_options
from blobenc.pca import GroupPCA
from blobenc.plan import BASELINE, MemoryPlan, available_memory
from blobenc.profile import timed
from blobenc.runtime import large_blocks_mapped, release_memory
from blobenc.scoring import validation_scores
from blobenc.train.checkpoint import (
    PCA_FILE,
    ModelSpec,
    RunSpec,
    load_state,
)
from blobenc.train.config import HeadConfig, resolve_schedule
from blobenc.train.data import HeadData, feature_row_bytes
from blobenc.train.init import closed_form_start
from blobenc.train.step import head_seed
from blobenc.train.trainer import (
    Callback,
    add_trial,
    finish_run,
    finished_summary,
    start_run,
    total_steps,
    train_trials,
)
from blobenc.train.validation import save_validation, val_predictions

logger = logging.getLogger(__name__)


def _trial_dir(out: Path, k: int, n: int) -> Path:
    return out if n == 1 else out / f"trial-{k:02d}"


def _model_spec(cfg: HeadConfig, data: HeadData, cache: FeatureCache, n_components: int, pca: str) -> ModelSpec:
    """What rebuilds the head; `pca` is the run's PCA file relative to the trial folder, which the
    checkpoints take their frozen embedding from."""
    layers = list(cfg.layers or data.layers)
    return ModelSpec(
        kind="head",
        head=cfg.head,
        pca=pca,
        kwargs=head_kwargs(cfg, cache, layers, len(data.subjects), data.group.n_vertices, n_components),
        subjects=data.subjects,
        layers=layers,
        features=cache.feature_spec(),
        cache=str(cache.path),
        group=data.group.to_dict(),
    )


def _with_regions(configs: list[HeadConfig], dataset) -> tuple[list[HeadConfig], list[np.ndarray | None]]:
    """The configs, those of a head with queries and `regions: rois` given one query per ROI and
    hemisphere of the dataset; and for each config the group targets' regions its head is built
    with (data.base.group_regions), None for the others."""
    wanted = [c.regions == "rois" and "queries" in head_options(c.head, c.to_dict()) for c in configs]
    if not any(wanted):
        return configs, [None] * len(configs)
    labels, names = group_regions(dataset)
    if not names:
        raise ConfigError(f"regions=rois: {dataset.root} has no ROI labels to make queries of; use regions=kmeans")
    resolved = [replace(c, queries=len(names)) if w else c for c, w in zip(configs, wanted, strict=True)]
    return resolved, [labels if w else None for w in wanted]


def head_kwargs(cfg: HeadConfig, cache: FeatureCache, layers: list[str], n_subjects: int, n_vertices: int, p: int):
    """The arguments a registered head is built with (ModelSpec.kwargs)."""
    return {
        "layer_shapes": [list(cache.attrs["layer_shapes"][n]) for n in layers],
        "n_subjects": n_subjects,
        "n_vertices": n_vertices,
        "hidden_dim": cfg.hidden_dim,
        "proj_dim": p,
        "dropout": cfg.dropout,
    } | head_options(cfg.head, cfg.to_dict())


def head_bytes(cfg: HeadConfig, cache: FeatureCache, layers: list[str], n_subjects: int, n_vertices: int, p: int):
    """A head's training memory from its trainable parameters (built on the meta device: no
    memory): weights, gradients, AdamW's two moments and the best epoch's copy, float32."""
    with torch.device("meta"):
        head = create_head(cfg.head, **head_kwargs(cfg, cache, list(cfg.layers or layers), n_subjects, n_vertices, p))
    return 5 * 4 * sum(t.numel() for t in head.parameters() if t.requires_grad)


def fit_head(
    cache_path: Path | str,
    data_root: Path | str,
    out: Path | str,
    configs: list[HeadConfig],
    *,
    pca_path: Path | str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    max_memory: int | None = None,
    feature_memory: int | None = None,
    checkpoint_minutes: float = 10.0,
    halving: int | None = None,
    ensemble: int | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Train every config in `configs` in one pass over the data; returns the run summary.

    `halving` (a reduction factor, e.g. 2): successive halving, the worse trials stopped at each rung.
    `ensemble` K: with one config, K heads of it with init seeds seed, seed+1, ... trained side by
    side; with several, the best K; either way averaged at prediction (`ensemble.json`).

    `max_memory` (bytes; None: the memory available): the plan (head_plan) is logged and refused
    beyond it. `feature_memory` (bytes; None: what the plan leaves of `max_memory`): features that
    do not fit are streamed from the cache by chunks.
    `checkpoint_minutes`: how often the last weights and training state are written (besides the
    end and Ctrl-C), for --resume. `resume`: go on from the last checkpoint, checked to be of the
    same settings, features and dataset (a run that ended is left as it is, one with no checkpoint
    starts over); `overwrite`: replace what `out` holds.
    """
    out = Path(out)
    if ensemble is not None and ensemble < 1:
        raise ConfigError(f"--ensemble {ensemble}: expected at least 1 member")
    if ensemble and ensemble > 1 and len(configs) == 1:
        configs = [replace(configs[0], init_seed=head_seed(configs[0]) + k) for k in range(ensemble)]
    elif ensemble and ensemble > len(configs):
        raise ConfigError(f"--ensemble {ensemble}: more members than the {len(configs)} configs trained")
    base = configs[0]
    run_file = out / "run.json"
    start = start_run(out, configs, resume, base, overwrite, checkpoint_minutes)
    if start.finished:
        return finished_summary(out)
    device, amp, distributed, main, resume = start.device, start.amp, start.distributed, start.main, start.resume
    cache = FeatureCache.open(cache_path)
    dataset = open_dataset(data_root)
    wanted = {n for c in configs for n in (c.layers or cache.layers)}
    unknown = sorted(wanted - set(cache.layers))
    if unknown:
        raise ConfigError(
            f"layers: {unknown[0]!r} is not a layer of the cache {cache.path}; it has {', '.join(cache.layers)}"
        )
    layers = [n for n in cache.layers if n in wanted]
    # before any work: a dataset without ROI labels is refused for `regions: rois`
    with_regions, regions_of = _with_regions(configs, dataset)
    data_id = dataset_id(dataset)  # once: it hashes every image key
    if resume:
        start.check_inputs(cache.feature_spec(), layers, data_id)

    split_file = out / "split.json"
    split = ValidationSplit.load(split_file) if resume else dataset.validation_split(base.val_fraction, base.seed)
    budget = available_memory() if max_memory is None else max_memory
    plan = head_plan(cache, dataset, split, layers, with_regions, pca_path is not None or resume)
    training = plan.phases["training"]
    in_memory = training["features"]
    host_room = budget - sum(plan.resident.values()) - sum(training.values()) + in_memory
    given_memory = feature_memory
    if device.type == "cuda":  # features in GPU memory when they fit it, read through the host by chunks
        if feature_memory is None:
            n_train = sum(len(split.rows(s)[0]) for s in dataset.subjects.values())
            batch = max(resolve_schedule(c, n_train).batch_size for c in configs)
            feature_memory = torch.cuda.mem_get_info(device)[0] - gpu_training_memory(cache, layers, plan, batch)
        if all_agree(in_memory <= feature_memory):  # every DDP rank on the same path
            feature_memory = None
            training["features"] = cache.attrs["chunk_images"] * feature_row_bytes(cache, layers)
        else:  # streamed, the shuffle buffer in host memory: its budget stays below the features'
            # size however much RAM the host has, or read_features would put them on the GPU
            feature_memory = min(host_room if given_memory is None else given_memory, in_memory - 1)
            training["features"] = min(in_memory, max(host_room, 0))
    elif feature_memory is None:  # features stream when the rest of training leaves too little for them
        feature_memory = host_room
        training["features"] = min(in_memory, max(host_room, 0))  # the stream fills what is left
    plan.check(budget, "lower --set hidden_dim or pca_samples, or --pca-components, or use a machine with more memory")
    logger.info(plan.describe())
    start.claim()
    if main:
        split.save(split_file)
    data = HeadData(cache, dataset, split, layers, device, progress)
    given = configs
    configs = [resolve_schedule(c, len(data.sets["train"])) for c in with_regions]  # epochs, batch from the data size
    base = configs[0]

    with large_blocks_mapped():  # the PCA's targets and solver (~11 GB at the full NSD) are not kept
        pca = _group_pca(out / PCA_FILE, pca_path, resume, base, data, main)
    # after the PCA: its sample of group-space targets and the features never share the memory
    data.read_features(None if feature_memory is None else max(feature_memory, 0), base.batch_size, base.feature_dtype)
    n_components = len(pca.components_)
    if main:
        RunSpec(
            kind="fit-head",
            cache=str(cache_path),
            data=str(data_root),
            configs=[c.to_dict() for c in given],
            resolved=[c.to_dict() for c in configs],
            train_samples=len(data.sets["train"]),
            pca_components=n_components,
            pca_explained_variance=float(pca.explained_variance_ratio_.sum()),
            features=cache.feature_spec().to_dict(),
            dataset=data_id,
        ).write(run_file)

    built = []
    for k, cfg in enumerate(configs):
        tdir = _trial_dir(out, k, len(configs))
        spec = _model_spec(cfg, data, cache, n_components, PCA_FILE if tdir == out else f"../{PCA_FILE}")
        torch.manual_seed(head_seed(cfg))  # same init whether trained alone or in a sweep
        model = create_head(cfg.head, **spec.kwargs)
        if regions_of[k] is not None:
            model.set_regions(torch.from_numpy(regions_of[k]))
        model.set_embedding(torch.from_numpy(pca.components_), torch.from_numpy(pca.mean_))
        built.append((tdir, cfg, spec, model.to(device), [data.layers.index(n) for n in spec.layers]))
    data.embed(*built[0][3].embedding())  # every trial shares the PCA
    release_memory()  # the responses' blocks it read, of a different size per subject
    starts = [None] * len(built)
    if not resume:  # closed-form starts (config `init`): one pass over the data for every trial
        models = [(model, idx, cfg.init) for _, cfg, _, model, idx in built]
        starts = closed_form_start(models, data, base.batch_size, *built[0][3].embedding())
        release_memory()
    trials: list = []
    for (tdir, cfg, spec, model, idx), start in zip(built, starts, strict=True):
        trial = add_trial(
            trials,
            tdir.name if len(configs) > 1 else "run",
            tdir,
            cfg,
            model,
            idx,
            replace(spec, start=start) if start else spec,
            total_steps(data, base),
            device,
            distributed,
            main,
        )
        trial.validate_start = start is not None  # a closed-form start: the best until an epoch beats it
    summary = train_trials(
        out, trials, data, base, device, amp, resume, progress, "fit-head", checkpoint_minutes, halving, callbacks
    )
    if summary is not None and ensemble and ensemble > 1:
        summary["ensemble"] = _ensemble(out, trials, data, base, device, amp, ensemble)
        write_json(out / "summary.json", summary)
    if summary is not None:
        finish_run(out)
    return summary


def _ensemble(out: Path, trials: list, data, base, device, amp, k: int) -> dict:
    """The best k trials as one model (their best weights, predictions averaged): `ensemble.json`
    names them for load_run/predict; returns them with the ensemble's validation scores."""
    ranked = sorted((t for t in trials if t[0].best.state is not None), key=lambda t: -t[0].best.score)[:k]
    for trial, _ in ranked:
        load_state(trial.model, trial.best.state)
    pred = np.mean(val_predictions([t for t, _ in ranked], data, base.batch_size, device, amp), axis=0)
    s = data.sets["val"]
    val = validation_scores(pred, data.val_target, s.subject, data.subjects, data.group_index, data.group.n_vertices)
    result = {"members": [str(d.relative_to(out)) for _, d in ranked], "val": val}
    result["val_rois"] = save_validation(out, pred, data, "ensemble")  # what predict uses: the average
    write_json(out / "ensemble.json", result)
    logger.info(
        "ensemble of %d: validation median R² %.4f (best member %.4f)",
        len(ranked),
        val["median_r2"],
        ranked[0][0].best.score,
    )
    return result


def head_plan(
    cache: FeatureCache, dataset, split: ValidationSplit, layers: list[str], configs: list, pca_given: bool
) -> MemoryPlan:
    """fit-head's memory, from the shapes alone: the group PCA (its sample of group-space targets,
    their mask, the solver's work: GroupPCA.fit_memory) or training (features in memory (float16),
    validation targets, each trial's V x P embedding, the embedded targets, validation
    predictions), whichever is larger: features and validation targets are read after the PCA."""
    n_train = n_val = 0
    keys: set = set()
    for subject in dataset.subjects.values():
        train, val = split.rows(subject)
        n_train, n_val = n_train + len(train), n_val + len(val)
        keys.update(subject.keys["train"])
    v, n_subjects = dataset.group.n_vertices, len(dataset.subjects)
    row_bytes = feature_row_bytes(cache, layers, configs[0].feature_dtype)
    resolved = [resolve_schedule(c, n_train) for c in configs]
    p = max(c.proj_dim for c in resolved)
    plan = MemoryPlan("fit-head", {"baseline": BASELINE})
    plan.phases["training"] = {
        "features": len(keys) * row_bytes,
        "validation targets": n_val * v * 5,
        "embeddings": (len(configs) + 1) * v * p * 4,
        "embedded targets": n_train * p * 4 + n_subjects * p * p * 4,
        "validation predictions": 3 * n_val * v * 4,
        "heads": sum(head_bytes(c, cache, layers, n_subjects, v, c.proj_dim) for c in resolved),
    }
    if not pca_given:
        m = min(n_train, resolved[0].pca_samples)
        shared = set.intersection(*(set(dataset.group_index(s).tolist()) for s in dataset.subjects))
        solver = GroupPCA(p).fit_memory(m, v, incomplete_columns=v - len(shared))
        plan.phases["group PCA"] = {"targets": m * v * 5, "solver": solver}
    return plan


def gpu_training_memory(cache: FeatureCache, layers: list[str], plan: MemoryPlan, batch_size: int) -> int:
    """GPU memory training needs besides the features held there: the plan's training phase (the
    embeddings, embedded targets and validation work live on the device too), a batch gathered as
    float32 and its products, and 1 GiB for CUDA's context and allocator slack."""
    training = plan.phases["training"]
    lead = 2 if cache.attrs["views"] > 1 else 1  # a batch gathers one view of each image
    batch = 4 * batch_size * sum(int(np.prod(cache.array(n).shape[lead:])) for n in layers)
    return sum(training.values()) - training["features"] + 3 * batch + (1 << 30)


def pca_samples(n: int, cap: int, seed: int) -> np.ndarray | None:
    """The training samples the group PCA is fitted on: all of them up to `cap`, else `cap` drawn
    at random (seeded), sorted. The full NSD's ~75k x 39.5k float32 targets take 12 GB; 16k rows of
    them, 2.5 GB and the exact Gram route (docs/benchmarks.md measures what the draw costs)."""
    if n <= cap:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


@timed("pca")
def _group_pca(target: Path, pca_path, resume: bool, base: HeadConfig, data: HeadData, main: bool) -> GroupPCA:
    if pca_path is not None or resume:
        pca = GroupPCA.load(pca_path if pca_path is not None else target)
        if pca.group is None or not pca.group.same_as(data.group):
            raise ConfigError(f"{pca_path or target}: fitted in another vertex space than this dataset's group space")
    else:
        pca = GroupPCA(base.proj_dim, seed=base.seed, device=data.device)
        samples = pca_samples(len(data.sets["train"]), base.pca_samples, base.seed)
        # a temporary: fit in place
        pca.fit(data.group_targets("train", samples), data.observed("train", samples), copy=False)
        pca.group = data.group
        logger.info(
            "group PCA: %d components explain %.1f%% of the variance",
            len(pca.components_),
            100 * pca.explained_variance_ratio_.sum(),
        )
    if main and (pca_path is not None or not resume):
        pca.save(target)
    return pca
