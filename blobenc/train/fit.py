"""`blobenc fit-head`: group PCA plus one or many heads trained from the cache in one pass (docs/fit-head.md)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.progress import TextColumn
from torch.nn.parallel import DistributedDataParallel

from blobenc.data.base import ValidationSplit, open_dataset
from blobenc.distributed import barrier, init_from_env, is_main, rank, world_size
from blobenc.errors import BlobencError, ConfigError
from blobenc.features.cache import FeatureCache
from blobenc.heads import create_head
from blobenc.pca import GroupPCA
from blobenc.progress import make_progress
from blobenc.runtime import resolve_device, resolve_precision
from blobenc.scoring import pearson_r, r2_score
from blobenc.train.checkpoint import (
    RUN_FORMAT,
    load_optimizer_state,
    load_weights,
    optimizer_state,
    read_json,
    save_weights,
    write_json,
)
from blobenc.train.config import HeadConfig
from blobenc.train.data import HeadData
from blobenc.train.loop import (
    Trial,
    pooled_r2,
    predict_group,
    steps_per_epoch,
    train_step,
    validation_scores,
)

logger = logging.getLogger(__name__)


class TrainingError(BlobencError):
    """Training cannot go on (a non-finite loss in every trial)."""


def _trial_dir(out: Path, k: int, n: int) -> Path:
    return out if n == 1 else out / f"trial-{k:02d}"


def _model_spec(cfg: HeadConfig, data: HeadData, cache: FeatureCache, n_components: int) -> dict:
    layers = list(cfg.layers or data.layers)
    return {
        "format": RUN_FORMAT,
        "head": cfg.head,
        "kwargs": {
            "layer_shapes": [data.layer_shapes[data.layers.index(n)] for n in layers],
            "n_subjects": len(data.subjects),
            "n_vertices": data.group.n_vertices,
            "hidden_dim": cfg.hidden_dim,
            "proj_dim": n_components,
            "dropout": cfg.dropout,
        },
        "subjects": data.subjects,
        "layers": layers,
        "features": cache.feature_spec(),
        "cache": str(cache.path),
        "group": data.group.to_dict(),
    }


def _val_predictions(trials: list[Trial], data, batch_size: int, device, amp) -> list[np.ndarray]:
    """Group-space predictions (N_val, V) of the validation samples, in sample order, for every
    trial from one pass over the validation data (a streamed cache is read once, not per trial)."""
    order, preds = [], [[] for _ in trials]
    with torch.no_grad():
        for idx, feats, subject in data.val_batches(batch_size):
            for out, trial in zip(preds, trials, strict=True):
                inputs = [([feats[j] for j in trial.layer_idx], subject)]
                out.append(predict_group(trial.model, iter(inputs), device, amp))
            order.append(idx)
    idx = np.concatenate(order)
    result = []
    for out in preds:
        pred = np.empty((len(idx), data.group.n_vertices), dtype=np.float32)
        pred[idx] = torch.cat(out).numpy()
        result.append(pred)
    return result


def val_tables(pred: np.ndarray, data) -> tuple[dict, dict[str, torch.Tensor]]:
    """Validation beyond the headline, from group-space predictions `pred` of the validation samples:
    R² per ROI and hemisphere (each vertex's R² pooled over subjects, as the headline median,
    averaged over the subjects' ROI masks), and per subject its own Pearson r and R² at each of its
    native vertices (`<subject>.r`, `<subject>.r2`), which `val_vertex.safetensors` keeps for maps.
    Shared by every run kind (fit-head, finetune, fit-ridge)."""
    from blobenc.predictions import mean_rois, roi_means

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


def _evaluate(trials: list[Trial], data, batch_size: int, device, amp) -> list[dict]:
    """Validation scores of every trial, from one pass over the validation data."""
    s = data.sets["val"]
    return [
        validation_scores(pred, data.val_target, s.subject, data.subjects, data.group_index, data.group.n_vertices)
        for pred in _val_predictions(trials, data, batch_size, device, amp)
    ]


def start_run(out: Path, configs: list, resume: bool, base) -> tuple:
    """Device, precision, process group; the run folder checked (new, or resumed with the same configs)."""
    device = resolve_device(base.device)
    amp = resolve_precision(base.precision, device)
    distributed = init_from_env(device)
    main = is_main()
    if resume:
        stored = read_json(out / "run.json")
        if stored.get("configs") != [c.to_dict() for c in configs]:
            raise ConfigError(
                f"{out}: --resume with other settings than the run was started with; resume with the same options"
            )
    elif main and out.exists() and any(p.name != "log.txt" for p in out.iterdir()):  # the CLI's log may be there
        raise ConfigError(f"{out}: exists and is not empty; use --resume to continue it or a new --out")
    if main:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    return device, amp, distributed, main


def add_trial(
    trials: list,
    name: str,
    tdir: Path,
    cfg,
    model: torch.nn.Module,
    layer_idx: list[int],
    spec: dict,
    total_steps: int,
    device,
    distributed: bool,
    main: bool,
) -> Trial:
    """Set up a trial's optimizer and schedule (DDP-wrapped under torchrun) and write its config files."""
    trial = Trial(name, cfg, model, layer_idx)
    trial.setup(total_steps)
    if distributed:  # gradients averaged across ranks; each rank trains on its slice of every batch
        trial.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        trial.rng_state = torch.Generator().manual_seed(cfg.seed + rank()).get_state()
    if main:
        tdir.mkdir(exist_ok=True)
        write_json(tdir / "model.json", spec)
        (tdir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    trials.append((trial, tdir))
    return trial


def fit_head(
    cache_path: Path | str,
    data_root: Path | str,
    out: Path | str,
    configs: list[HeadConfig],
    *,
    pca_path: Path | str | None = None,
    resume: bool = False,
    max_memory: int | None = None,
    progress: bool = True,
) -> dict:
    """Train every config in `configs` in one pass over the data; returns the run summary.

    `max_memory` (bytes): features that do not fit are streamed from the cache by chunks.
    """
    out = Path(out)
    base = configs[0]
    run_file = out / "run.json"
    device, amp, distributed, main = start_run(out, configs, resume, base)
    cache = FeatureCache.open(cache_path)
    dataset = open_dataset(data_root)

    split_file = out / "split.json"
    split = ValidationSplit.load(split_file) if resume else dataset.validation_split(base.val_fraction, base.seed)
    if main:
        split.save(split_file)
    wanted = {n for c in configs for n in (c.layers or cache.layers)}
    data = HeadData(
        cache,
        dataset,
        split,
        [n for n in cache.layers if n in wanted],
        device,
        progress,
        max_memory=max_memory,
        batch_size=base.batch_size,
    )

    pca = _group_pca(out / "pca.safetensors", pca_path, resume, base, data, main)
    n_components = len(pca.components_)
    if main:
        write_json(
            run_file,
            {
                "format": RUN_FORMAT,
                "kind": "fit-head",
                "cache": str(cache_path),
                "data": str(data_root),
                "configs": [c.to_dict() for c in configs],
                "pca_components": n_components,
                "pca_explained_variance": float(pca.explained_variance_ratio_.sum()),
            },
        )

    trials: list = []
    for k, cfg in enumerate(configs):
        spec = _model_spec(cfg, data, cache, n_components)
        torch.manual_seed(cfg.seed)  # same init whether trained alone or in a sweep
        model = create_head(cfg.head, **spec["kwargs"])
        model.set_embedding(torch.from_numpy(pca.components_), torch.from_numpy(pca.mean_))
        tdir = _trial_dir(out, k, len(configs))
        add_trial(
            trials,
            tdir.name if len(configs) > 1 else "run",
            tdir,
            cfg,
            model.to(device),
            [data.layers.index(n) for n in spec["layers"]],
            spec,
            total_steps(data, base),
            device,
            distributed,
            main,
        )
    data.embed(*trials[0][0].model.embedding())  # every trial shares the PCA
    return train_trials(out, trials, data, base, device, amp, resume, progress, "fit-head")


def total_steps(data, base) -> int:
    """Optimizer steps of the whole run: what each trial's schedule spans."""
    return base.epochs * steps_per_epoch(len(data.sets["train"]), base.batch_size, 2 * world_size())


def train_trials(out: Path, trials: list, data, base, device, amp, resume: bool, progress: bool, label: str):
    """The epoch loop every run shares: each batch fed to every trial, validation, checkpoints, summary.

    `data` gives train_batches(batch_size, seed, epoch, min_last) and val_batches(batch_size).
    Returns the run summary (None on ranks other than 0 under torchrun).
    """
    distributed, main = world_size() > 1, is_main()
    n_train = len(data.sets["train"])
    min_last = 2 * world_size()  # batch norm needs two samples on every rank
    n_steps = steps_per_epoch(n_train, base.batch_size, min_last)
    start_epoch = _restore(trials) if resume else 0
    bar = make_progress(TextColumn("{task.fields[status]}"), enabled=progress)
    t0 = time.perf_counter()
    with bar:
        task = bar.add_task(label, total=(base.epochs - start_epoch) * n_steps, status="")
        for epoch in range(start_epoch, base.epochs):
            losses = {id(t): [] for t, _ in trials}
            for feats, subject, r, q in data.train_batches(base.batch_size, base.seed, epoch, min_last):
                if distributed:  # this rank's slice of the global batch
                    sl = slice(rank(), None, world_size())
                    feats, subject, r, q = [f[sl] for f in feats], subject[sl], r[sl], q[sl]
                for trial, _ in trials:
                    if trial.failed:
                        continue
                    loss = train_step(trial, feats, subject, r, q, data.targets, device, amp)
                    if not math.isfinite(loss):
                        trial.failed = f"loss became {loss} at epoch {epoch}, step {trial.step}"
                        logger.error(
                            "%s: %s; its best checkpoint (epoch %d) is kept", trial.name, trial.failed, trial.best_epoch
                        )
                    losses[id(trial)].append(loss)
                bar.update(task, advance=1)
            running = [(t, d) for t, d in trials if not t.failed]
            scores = _evaluate([t for t, _ in running], data, base.batch_size, device, amp) if running else []
            val = {id(t): v for (t, _), v in zip(running, scores, strict=True)}
            for trial, tdir in trials:
                if trial.failed and trial.history and trial.history[-1].get("failed"):
                    continue  # its failure is on record already
                _end_epoch(trial, tdir, epoch, losses[id(trial)], val.get(id(trial)), main)
            best = max(trials, key=lambda t: t[0].best_score)[0]
            bar.update(task, status=f"epoch {epoch + 1}/{base.epochs} best val median R² {best.best_score:.4f}")
    seconds = time.perf_counter() - t0
    barrier()
    if not main:
        return None
    summary, best_trial, best_dir = _summarize(out, trials, seconds, n_train * (base.epochs - start_epoch))
    best_trial.model.load_state_dict(load_weights(best_dir / "best.safetensors"))
    [pred] = _val_predictions([best_trial], data, base.batch_size, device, amp)
    summary["val_rois"], vertex = val_tables(pred, data)
    save_weights(out / "val_vertex.safetensors", vertex, {"trial": summary["trial"]})
    write_json(out / "summary.json", summary)
    return summary


def _group_pca(target: Path, pca_path, resume: bool, base: HeadConfig, data: HeadData, main: bool) -> GroupPCA:
    if pca_path is not None or resume:
        pca = GroupPCA.load(pca_path if pca_path is not None else target)
        if pca.group is None or not pca.group.same_as(data.group):
            raise ConfigError(f"{pca_path or target}: fitted in another vertex space than this dataset's group space")
    else:
        pca = GroupPCA(base.proj_dim, seed=base.seed, device=data.device)
        pca.fit(data.group_targets("train"), data.observed("train"), copy=False)  # a temporary: fit in place
        pca.group = data.group
        logger.info(
            "group PCA: %d components explain %.1f%% of the variance",
            len(pca.components_),
            100 * pca.explained_variance_ratio_.sum(),
        )
    if main and (pca_path is not None or not resume):
        pca.save(target)
    return pca


def _end_epoch(trial: Trial, tdir: Path, epoch: int, losses: list[float], val: dict | None, main: bool) -> None:
    finite = [v for v in losses if math.isfinite(v)]
    record = {
        "epoch": epoch,
        "train_loss": float(np.mean(finite)) if finite else None,
        "lr": trial.optimizer.param_groups[0]["lr"],
        "step": trial.step,
    }
    if trial.failed:
        record["failed"] = trial.failed
    else:
        record["val"] = val
        score = record["val"]["median_r2"]
        improved = score > trial.best_score
        if improved:
            trial.best_score, trial.best_epoch = score, epoch
        if main:  # every rank validates (the same weights under DDP); only rank 0 writes
            _save_checkpoints(trial, tdir, epoch, record["val"], improved)
    trial.history.append(record)
    if main:
        with (tdir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")


def _save_checkpoints(trial: Trial, tdir: Path, epoch: int, val: dict, improved: bool) -> None:
    save_weights(tdir / "last.safetensors", trial.model.state_dict(), {"epoch": epoch})
    if improved:
        save_weights(
            tdir / "best.safetensors", trial.model.state_dict(), {"epoch": epoch, "median_r2": val["median_r2"]}
        )
        write_json(tdir / "summary.json", {"best_epoch": epoch, "val": val, "trial": trial.name})
    tensors, groups = optimizer_state(trial.optimizer)
    tensors["rng_state"] = trial.rng_state
    meta = {
        "epoch": epoch,
        "step": trial.step,
        "best_score": trial.best_score,
        "best_epoch": trial.best_epoch,
        "param_groups": groups,
    }
    save_weights(tdir / "state.safetensors", tensors, meta)


def _restore(trials) -> int:
    """Load each trial's last weights, optimizer, RNG and step; return the next epoch."""
    from safetensors import safe_open

    epochs = set()
    for trial, tdir in trials:
        path = tdir / "state.safetensors"
        if not path.is_file():
            raise ConfigError(f"{path}: nothing to resume (no epoch finished yet); start a new run")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        trial.model.load_state_dict(load_weights(tdir / "last.safetensors"))
        load_optimizer_state(trial.optimizer, tensors, meta["param_groups"])
        trial.rng_state = tensors["rng_state"]
        trial.step = int(meta["step"])
        trial.scheduler.step_update(trial.step)
        trial.best_score, trial.best_epoch = float(meta["best_score"]), int(meta["best_epoch"])
        epochs.add(int(meta["epoch"]))
    if len(epochs) != 1:
        raise ConfigError("trials stopped at different epochs; cannot resume them in one pass")
    return epochs.pop() + 1


def _summarize(out: Path, trials, seconds: float, samples: int) -> tuple[dict, Trial, Path]:
    """The run summary (the best trial's, plus every trial's row) and the best trial with its folder."""
    ranked = sorted(trials, key=lambda t: t[0].best_score, reverse=True)
    rows = [
        {
            "trial": t.name,
            "dir": str(d.relative_to(out)) if d != out else ".",
            "config": t.config.to_dict(),
            "best_epoch": t.best_epoch,
            "median_r2": t.best_score,
            "failed": t.failed,
        }
        for t, d in ranked
    ]
    if all(t.failed for t, _ in trials) and all(t.best_epoch < 0 for t, _ in trials):
        raise TrainingError(f"{out}: every trial stopped: {trials[0][0].failed}")
    if all(t.best_epoch < 0 for t, _ in trials):
        raise TrainingError(f"{out}: no epoch gave a finite validation score (median R² is NaN)")
    best_trial, best_dir = ranked[0]
    summary = read_json(best_dir / "summary.json")
    summary |= {"trial": rows[0]["dir"], "seconds": seconds, "samples_per_s": samples / seconds, "trials": rows}
    if len(trials) > 1:
        write_json(out / "sweep.json", {"trials": rows, "best": rows[0]["dir"]})
    return summary, best_trial, best_dir
