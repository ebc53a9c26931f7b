"""`blobenc fit-head`: group PCA plus one or many heads trained from the cache in one pass (docs/fit-head.md)."""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.progress import TextColumn
from torch.nn.parallel import DistributedDataParallel

from blobenc.data import open_dataset
from blobenc.data.base import ValidationSplit
from blobenc.distributed import all_agree, barrier, init_from_env, is_main, rank, world_size
from blobenc.errors import ConfigError, TrainingError
from blobenc.features.cache import FeatureCache
from blobenc.files import read_json, write_json
from blobenc.heads import create_head
from blobenc.pca import GroupPCA
from blobenc.plan import BASELINE, MemoryPlan, available_memory
from blobenc.profile import timed, timed_iter
from blobenc.progress import make_progress
from blobenc.runtime import large_blocks_mapped, release_memory, resolve_device, resolve_precision
from blobenc.scoring import pearson_r, r2_score
from blobenc.train.checkpoint import (
    PCA_FILE,
    RUN_FORMAT,
    load_optimizer_state,
    load_state,
    load_weights,
    optimizer_state,
    save_weights,
    trained_state,
)
from blobenc.train.config import HeadConfig, resolve_schedule
from blobenc.train.data import HeadData, feature_row_bytes
from blobenc.train.init import closed_form_start
from blobenc.train.loop import (
    Trial,
    head_seed,
    pooled_r2,
    predict_group,
    steps_per_epoch,
    train_step,
    validation_scores,
)

logger = logging.getLogger(__name__)


def _trial_dir(out: Path, k: int, n: int) -> Path:
    return out if n == 1 else out / f"trial-{k:02d}"


def _model_spec(cfg: HeadConfig, data: HeadData, cache: FeatureCache, n_components: int, pca: str) -> dict:
    """model.json: everything to rebuild the head; `pca` is the run's PCA file relative to the
    trial folder, which the checkpoints take their frozen embedding from."""
    layers = list(cfg.layers or data.layers)
    return {
        "format": RUN_FORMAT,
        "head": cfg.head,
        "pca": pca,
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


@timed("predict")
def _val_predictions(trials: list[Trial], data, batch_size: int, device, amp) -> list[np.ndarray]:
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
    from blobenc.scoring import mean_rois, roi_means

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
        # keys added since the run started take their defaults (feature_dtype: a run from before it)
        defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(base)}
        if [defaults | c for c in stored.get("configs") or []] != [defaults | c.to_dict() for c in configs]:
            raise ConfigError(
                f"{out}: --resume with other settings than the run was started with; resume with the same options"
            )
    elif main and out.exists() and any(p.name != "log.txt" for p in out.iterdir()):  # the CLI's log may be there
        raise ConfigError(f"{out}: exists and is not empty; use --resume to continue it or a new --out")
    barrier()  # the folder is made once the plan is checked: a refused run leaves nothing
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
    trial = Trial(name, cfg, model, layer_idx, keep_embedding=not spec.get("pca"))
    trial.setup(total_steps, device, seed_offset=rank() if distributed else 0)
    if distributed:  # gradients averaged across ranks; each rank trains on its slice of every batch
        trial.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
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
    feature_memory: int | None = None,
    checkpoint_minutes: float = 10.0,
    halving: int | None = None,
    ensemble: int | None = None,
    progress: bool = True,
) -> dict:
    """Train every config in `configs` in one pass over the data; returns the run summary.

    `halving` (a reduction factor, e.g. 2): successive halving, the worse trials stopped at each rung.
    `ensemble` K: with one config, K heads of it with init seeds seed, seed+1, ... trained side by
    side; with several, the best K; either way averaged at prediction (`ensemble.json`).

    `max_memory` (bytes; None: the memory available): the plan (head_plan) is logged and refused
    beyond it. `feature_memory` (bytes; None: what the plan leaves of `max_memory`): features that
    do not fit are streamed from the cache by chunks.
    `checkpoint_minutes`: how often the last weights and training state are written (besides the
    end and Ctrl-C), for --resume.
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
    device, amp, distributed, main = start_run(out, configs, resume, base)
    cache = FeatureCache.open(cache_path)
    dataset = open_dataset(data_root)

    split_file = out / "split.json"
    split = ValidationSplit.load(split_file) if resume else dataset.validation_split(base.val_fraction, base.seed)
    wanted = {n for c in configs for n in (c.layers or cache.layers)}
    layers = [n for n in cache.layers if n in wanted]
    budget = available_memory() if max_memory is None else max_memory
    plan = head_plan(cache, dataset, split, layers, configs, pca_path is not None or resume)
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
    plan.check(budget, "lower --set pca_samples or --pca-components, or use a machine with more memory")
    logger.info(plan.describe())
    if main:
        out.mkdir(parents=True, exist_ok=True)
        split.save(split_file)
    data = HeadData(cache, dataset, split, layers, device, progress)
    given = configs
    configs = [resolve_schedule(c, len(data.sets["train"])) for c in configs]  # epochs, batch from the data size
    base = configs[0]

    with large_blocks_mapped():  # the PCA's targets and solver (~11 GB at the full NSD) are not kept
        pca = _group_pca(out / PCA_FILE, pca_path, resume, base, data, main)
    # after the PCA: its sample of group-space targets and the features never share the memory
    data.read_features(None if feature_memory is None else max(feature_memory, 0), base.batch_size, base.feature_dtype)
    n_components = len(pca.components_)
    if main:
        write_json(
            run_file,
            {
                "format": RUN_FORMAT,
                "kind": "fit-head",
                "cache": str(cache_path),
                "data": str(data_root),
                "configs": [c.to_dict() for c in given],
                "resolved": [c.to_dict() for c in configs],
                "train_samples": len(data.sets["train"]),
                "pca_components": n_components,
                "pca_explained_variance": float(pca.explained_variance_ratio_.sum()),
            },
        )

    built = []
    for k, cfg in enumerate(configs):
        tdir = _trial_dir(out, k, len(configs))
        spec = _model_spec(cfg, data, cache, n_components, PCA_FILE if tdir == out else f"../{PCA_FILE}")
        torch.manual_seed(head_seed(cfg))  # same init whether trained alone or in a sweep
        model = create_head(cfg.head, **spec["kwargs"])
        model.set_embedding(torch.from_numpy(pca.components_), torch.from_numpy(pca.mean_))
        built.append((tdir, cfg, spec, model.to(device), [data.layers.index(n) for n in spec["layers"]]))
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
            spec | ({"start": start} if start else {}),
            total_steps(data, base),
            device,
            distributed,
            main,
        )
        trial.validate_start = start is not None  # a closed-form start: the best until an epoch beats it
    summary = train_trials(
        out, trials, data, base, device, amp, resume, progress, "fit-head", checkpoint_minutes, halving
    )
    if summary is not None and ensemble and ensemble > 1:
        summary["ensemble"] = _ensemble(out, trials, data, base, device, amp, ensemble)
        write_json(out / "summary.json", summary)
    return summary


def _ensemble(out: Path, trials: list, data, base, device, amp, k: int) -> dict:
    """The best k trials as one model (their best weights, predictions averaged): `ensemble.json`
    names them for load_run/predict; returns them with the ensemble's validation scores."""
    ranked = sorted((t for t in trials if t[0].best_state is not None), key=lambda t: -t[0].best_score)[:k]
    for trial, _ in ranked:
        load_state(trial.model, trial.best_state)
    pred = np.mean(_val_predictions([t for t, _ in ranked], data, base.batch_size, device, amp), axis=0)
    s = data.sets["val"]
    val = validation_scores(pred, data.val_target, s.subject, data.subjects, data.group_index, data.group.n_vertices)
    result = {"members": [str(d.relative_to(out)) for _, d in ranked], "val": val}
    result["val_rois"] = save_validation(out, pred, data, "ensemble")  # what predict uses: the average
    write_json(out / "ensemble.json", result)
    logger.info(
        "ensemble of %d: validation median R² %.4f (best member %.4f)",
        len(ranked),
        val["median_r2"],
        ranked[0][0].best_score,
    )
    return result


def total_steps(data, base) -> int:
    """Optimizer steps of the whole run: what each trial's schedule spans."""
    return base.epochs * steps_per_epoch(len(data.sets["train"]), base.batch_size, 2 * world_size())


class StopRequest:
    """Ctrl-C (SIGINT) while training sets a flag that the loop checks between batches, so the
    state it then writes is the state after a whole batch (every trial stepped, or none). A second
    Ctrl-C interrupts at once. Installed only in the main thread; under torchrun every rank stops
    at the same batch."""

    def __enter__(self) -> StopRequest:
        self.requested, self._previous = False, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def check(self) -> bool:
        if world_size() > 1:
            flag = torch.tensor([float(self.requested)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.requested = bool(flag.item())
        return self.requested


def train_trials(
    out: Path,
    trials: list,
    data,
    base,
    device,
    amp,
    resume: bool,
    progress: bool,
    label: str,
    checkpoint_minutes: float = 10.0,
    halving: int | None = None,
):
    """The epoch loop every run shares: each batch fed to every active trial, validation,
    checkpoints, summary. With `halving` (a reduction factor, e.g. 2) the trials race: at each rung
    (`halving_rungs`) only the best 1/halving of those still in the race go on (successive halving).

    Checkpoints: best.safetensors holds the best epoch's weights, last.safetensors and
    state.safetensors (optimizer, RNG, position) what --resume needs. They are written every
    `checkpoint_minutes` (at the end of an epoch), at the end, and on Ctrl-C (between batches);
    the best weights are kept in memory in between. `data` gives train_batches(batch_size, seed,
    epoch, min_last, start) and val_batches(batch_size). Returns the run summary (None on ranks
    other than 0 under torchrun).
    """
    main = is_main()
    n_train = len(data.sets["train"])
    min_last = 2 * world_size()  # batch norm needs two samples on every rank
    n_steps = steps_per_epoch(n_train, base.batch_size, min_last)
    position = _restore(trials) if resume else (0, 0)  # (epoch, batches of it done)
    if not resume:
        _validate_starts(trials, data, base, device, amp)
    rungs = halving_rungs(len(trials), base.epochs, halving) if halving else {}
    bar = make_progress(TextColumn("{task.fields[status]}"), enabled=progress)
    t0 = time.perf_counter()
    last_write, samples = t0, 0
    with bar, StopRequest() as stop:
        todo = (base.epochs - position[0]) * n_steps - position[1]
        task = bar.add_task(label, total=max(todo, 0), status="")
        consistent = True  # the trials' states are those after `position`
        try:
            for epoch in range(position[0], base.epochs):
                if not any(t.active for t, _ in trials):
                    break
                t_epoch, n_epoch = time.perf_counter(), 0
                done = position[1] if epoch == position[0] else 0
                batches = data.train_batches(base.batch_size, base.seed, epoch, min_last, done)
                for feats, subject, r, q in timed_iter("batch", batches):
                    consistent = False
                    _train_batch(trials, feats, subject, r, q, data, device, amp, epoch)
                    done += 1
                    position, consistent = (epoch, done), True
                    n_epoch += len(subject) * world_size()
                    bar.update(task, advance=1)
                    if stop.check():
                        raise KeyboardInterrupt
                train_s = time.perf_counter() - t_epoch
                samples += n_epoch
                consistent = False
                records = _validate(trials, data, base, device, amp, epoch)
                _early_stop(trials, epoch)
                if halving and epoch in rungs:
                    _halve(trials, epoch, halving, rungs[epoch])
                last = epoch == base.epochs - 1 or not any(t.active for t, _ in trials)
                due = last or time.perf_counter() - last_write >= 60 * checkpoint_minutes
                for trial, tdir in trials:
                    # a trial stopped earlier is written once more if it changed since its last write
                    dirty = trial.active or not trial.best_written or trial.written_step != trial.step
                    written = _checkpoint(trial, tdir, (epoch + 1, 0)) if due and main and dirty else 0
                    record = records.get(id(trial))
                    if record is None:
                        continue  # a trial that stopped in an earlier epoch
                    record |= {
                        "seconds": time.perf_counter() - t_epoch,
                        "samples_per_s": n_epoch / max(train_s, 1e-9),
                        "bytes_written": written,
                    }
                    if main:
                        with (tdir / "metrics.jsonl").open("a") as f:
                            f.write(json.dumps(record) + "\n")
                if due:
                    last_write = time.perf_counter()
                position, consistent = (epoch + 1, 0), True
                best = max(trials, key=lambda t: t[0].best_score)[0]
                bar.update(task, status=f"epoch {epoch + 1}/{base.epochs} best val median R² {best.best_score:.4f}")
                if stop.check():
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if main and consistent:
                for trial, tdir in trials:
                    _checkpoint(trial, tdir, position)
                logger.warning("interrupted: state saved at epoch %d, batch %d; --resume goes on from there", *position)
            elif main:
                logger.warning("interrupted inside a step: --resume goes on from the last checkpoint")
            raise
    seconds = time.perf_counter() - t0
    barrier()
    if not main:
        return None
    summary, best_trial, _ = _summarize(out, trials, seconds, samples)
    load_state(best_trial.model, best_trial.best_state)
    [pred] = _val_predictions([best_trial], data, base.batch_size, device, amp)
    summary["val_rois"] = save_validation(out, pred, data, summary["trial"])
    write_json(out / "summary.json", summary)
    return summary


def _train_batch(trials, feats, subject, r, q, data, device, amp, epoch: int) -> None:
    """One optimizer step of every active trial on one batch (this rank's slice under torchrun)."""
    if world_size() > 1:
        sl = slice(rank(), None, world_size())
        feats, subject, r, q = [f[sl] for f in feats], subject[sl], r[sl], q[sl]
    for trial, _ in trials:
        if not trial.active:
            continue
        loss = train_step(trial, feats, subject, r, q, data.targets, device, amp)
        trial.epoch_losses.append(loss)
        if not math.isfinite(loss):
            trial.failed = f"loss became {loss} at epoch {epoch}, step {trial.step}"
            logger.error("%s: %s; its best checkpoint (epoch %d) is kept", trial.name, trial.failed, trial.best_epoch)
            if trial.best_state is not None:  # its weights go back to the best epoch's: no NaN written
                load_state(trial.model, trial.best_state)


@timed("validation")
def _validate(trials, data, base, device, amp, epoch: int) -> dict[int, dict]:
    """Validate the trials still training (one pass over the data for all) and bring each one's
    record, best score and best weights up to date: {id(trial): record} for this epoch."""
    running = [t for t, _ in trials if t.active]
    scores = _evaluate(running, data, base.batch_size, device, amp) if running else []
    val = {id(t): v for t, v in zip(running, scores, strict=True)}
    records = {}
    for trial, _ in trials:
        if trial.failed and trial.history and trial.history[-1].get("failed"):
            continue  # its failure is on record already
        if trial.stopped and id(trial) not in val:
            continue
        finite = [v for v in trial.epoch_losses if math.isfinite(v)]
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(finite)) if finite else None,
            "lr": trial.optimizer.param_groups[0]["lr"],
            "step": trial.step,
        }
        trial.epoch_losses = []
        if trial.failed:
            record["failed"] = trial.failed
        else:
            record["val"] = val[id(trial)]
            if record["val"]["median_r2"] > trial.best_score:
                trial.best_score, trial.best_epoch, trial.best_val = record["val"]["median_r2"], epoch, record["val"]
                trial.best_state = {
                    k: v.detach().clone() for k, v in trained_state(trial.model, trial.keep_embedding).items()
                }
                trial.best_written = False
        trial.history.append(record)
        records[id(trial)] = record
    return records


def halving_rungs(n_trials: int, epochs: int, eta: int = 2) -> dict[int, int]:
    """{epoch (0-based): halvings after it} for successive halving of n trials over `epochs`: the
    rounds end after epochs E/eta^R, ..., E/eta (R = ceil(log_eta n); rounded down, at least one
    epoch), each keeping the best 1/eta, so one trial is left for the last E/eta or more. 8 trials
    cost (1 + 3/2) x one trial's steps with eta 2 (less where the rounding cuts the early rounds)."""
    if n_trials < 2:
        return {}
    rounds = math.ceil(math.log(n_trials, eta) - 1e-9)
    rungs: dict[int, int] = {}
    for k in range(rounds):
        epoch = max(0, math.floor(epochs * eta ** (k - rounds)) - 1)
        rungs[epoch] = rungs.get(epoch, 0) + 1
    return rungs


def _halve(trials, epoch: int, eta: int, times: int) -> None:
    """Keep the best ceil(n / eta^times) of the trials still in the race (by best validation score so
    far; earlier trials first on ties); stop the others. Early-stopped trials stay in the race."""
    racing = [t for t, _ in trials if not t.failed and not (t.stopped or "").startswith("halving")]
    keep = math.ceil(len(racing) / eta**times)
    ranked = sorted(racing, key=lambda t: -t.best_score)  # stable: ties keep the trial order
    for place, trial in enumerate(ranked[keep:], start=keep + 1):
        if not trial.stopped:
            trial.stopped = f"halving after epoch {epoch}: rank {place} of {len(racing)} (best {trial.best_score:.4f})"
            logger.info("%s: %s", trial.name, trial.stopped)


def _validate_starts(trials, data, base, device, amp) -> None:
    """Validate the closed-form starts (config `init`) before any step: a start is the best weights
    until an epoch beats it (best_epoch -1), so training can only improve on it."""
    starts = [t for t, _ in trials if t.validate_start]
    for trial, val in zip(starts, _evaluate(starts, data, base.batch_size, device, amp) if starts else [], strict=True):
        trial.start_val = val
        if val["median_r2"] > trial.best_score:
            trial.best_score, trial.best_epoch, trial.best_val = val["median_r2"], -1, val
            trial.best_state = {
                k: v.detach().clone() for k, v in trained_state(trial.model, trial.keep_embedding).items()
            }
            trial.best_written = False


def _early_stop(trials, epoch: int) -> None:
    """Stop the trials whose validation score has not improved for `patience` epochs."""
    for trial, _ in trials:
        patience = trial.config.patience
        if trial.active and patience and epoch - trial.best_epoch >= patience:
            trial.stopped = f"early stop after epoch {epoch}: no better validation score in {patience} epochs"
            logger.info("%s: %s (best: epoch %d)", trial.name, trial.stopped, trial.best_epoch)


@timed("checkpoint")
def _checkpoint(trial: Trial, tdir: Path, position: tuple[int, int]) -> int:
    """Write the trial's best weights (when newer than the file), its last weights and its training
    state; returns the bytes written. The state is written last and names the step of the last
    weights, so a crash between the two is detected on resume."""
    written = 0
    if not trial.best_written and trial.best_state is not None:
        meta = {"epoch": trial.best_epoch, "median_r2": trial.best_score}
        written += save_weights(tdir / "best.safetensors", trial.best_state, meta)
        write_json(tdir / "summary.json", {"best_epoch": trial.best_epoch, "val": trial.best_val, "trial": trial.name})
        trial.best_written = True
    state = trained_state(trial.model, trial.keep_embedding)
    written += save_weights(tdir / "last.safetensors", state, {"step": trial.step})
    trial.written_step = trial.step
    tensors, groups = optimizer_state(trial.optimizer)
    tensors["rng_state"] = trial.rng_state
    meta = {
        "epoch": position[0],
        "batch": position[1],
        "step": trial.step,
        "best_score": trial.best_score,
        "best_epoch": trial.best_epoch,
        "param_groups": groups,
        "status": json.dumps(
            {
                "failed": trial.failed,
                "stopped": trial.stopped,
                "epoch_losses": trial.epoch_losses,
                "history": trial.history,
                "start_val": trial.start_val,
            }
        ),
    }
    return written + save_weights(tdir / "state.safetensors", tensors, meta)


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


def _restore(trials) -> tuple[int, int]:
    """Load each trial's last weights, optimizer, RNG, step, best weights and status; return the
    position (epoch, batches of it done) the run goes on from."""
    from safetensors import safe_open

    positions, active = set(), set()
    for trial, tdir in trials:
        path = tdir / "state.safetensors"
        if not path.is_file():
            raise ConfigError(f"{path}: nothing to resume (no checkpoint written yet); start a new run")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        with safe_open(str(tdir / "last.safetensors"), framework="pt") as f:
            last_step = f.metadata().get("step")
        if last_step != meta["step"]:
            raise ConfigError(
                f"{tdir}: last.safetensors (step {last_step}) and state.safetensors (step {meta['step']}) disagree: "
                "the run stopped while writing its checkpoint; start a new run"
            )
        load_state(trial.model, load_weights(tdir / "last.safetensors"))  # the embedding stays the run PCA's
        load_optimizer_state(trial.optimizer, tensors, meta["param_groups"])
        if tensors["rng_state"].numel() == trial.rng_state.numel():
            trial.rng_state = tensors["rng_state"]
        else:  # written on another device type (CPU <-> CUDA): its state does not fit this generator
            logger.warning("%s: resumed on another device type; dropout draws a new random stream", tdir)
        trial.step = int(meta["step"])
        trial.scheduler.step_update(trial.step)
        trial.best_score, trial.best_epoch = float(meta["best_score"]), int(meta["best_epoch"])
        status = json.loads(meta["status"])
        trial.failed, trial.stopped = status["failed"], status["stopped"]
        trial.epoch_losses, trial.history = status["epoch_losses"], status["history"]
        trial.start_val = status.get("start_val")
        if math.isfinite(trial.best_score):
            trial.best_state = load_weights(tdir / "best.safetensors")
            trial.best_val = read_json(tdir / "summary.json")["val"]
        positions.add(position := (int(meta["epoch"]), int(meta["batch"])))
        if trial.active:
            active.add(position)
        trial.written_step = trial.step
    if len(active) > 1:  # a stopped trial's state may be older: it trains no more
        raise ConfigError("trials stopped at different positions; cannot resume them in one pass")
    return active.pop() if active else max(positions)


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
            "stopped": t.stopped,
            "epochs": len(t.history),
            "steps": t.step,
            "start_median_r2": t.start_val["median_r2"] if t.start_val else None,
        }
        for t, d in ranked
    ]
    if all(t.failed for t, _ in trials) and not any(math.isfinite(t.best_score) for t, _ in trials):
        raise TrainingError(f"{out}: every trial stopped: {trials[0][0].failed}")
    if not any(math.isfinite(t.best_score) for t, _ in trials):
        raise TrainingError(f"{out}: no epoch gave a finite validation score (median R² is NaN)")
    best_trial, best_dir = ranked[0]
    summary = read_json(best_dir / "summary.json")
    summary |= {
        "trial": rows[0]["dir"],
        "seconds": seconds,
        "samples_per_s": samples / max(seconds, 1e-9),
        "trials": rows,
    }
    if len(trials) > 1:
        write_json(out / "sweep.json", {"trials": rows, "best": rows[0]["dir"]})
    return summary, best_trial, best_dir
