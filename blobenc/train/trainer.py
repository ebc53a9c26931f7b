"""The training loop every run shares (fit-head's trials, finetune's one): each batch fed to every
active trial, validation after each epoch, early stopping, successive halving, checkpoints and
Ctrl-C, and the run's summary. fit-head and finetune are drivers that build the trials and the
data and call `train_trials`; `Callback`s see each step and each validation."""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.progress import TextColumn
from torch.nn.parallel import DistributedDataParallel

from blobenc.distributed import barrier, broadcast_object, init_from_env, is_main, rank, world_size
from blobenc.errors import ConfigError, TrainingError
from blobenc.features.spec import FeatureSpec
from blobenc.files import read_json, write_json
from blobenc.profile import timed, timed_iter
from blobenc.progress import make_progress
from blobenc.runtime import resolve_device, resolve_precision
from blobenc.train.checkpoint import ModelSpec, RunSpec, load_state, restore_trials, trained_state, write_checkpoint
from blobenc.train.runfolder import RunFolder
from blobenc.train.step import Trial, steps_per_epoch, train_step
from blobenc.train.validation import evaluate_trials, save_validation, val_predictions

logger = logging.getLogger(__name__)


class Callback:
    """Sees the training loop from outside; each method does nothing unless overridden. Given to
    `fit_head` or `finetune` (`callbacks=[...]`): to log elsewhere (a dashboard), to choose the
    best epoch by a score of one's own, to stop a run (raise KeyboardInterrupt: the state is saved
    as on Ctrl-C). Under torchrun each rank calls its own."""

    def on_step_end(self, trial: Trial, loss: float) -> None:
        """After an optimizer step of `trial` (`trial.step` counts them); `loss` may be non-finite."""

    def on_validation(self, epoch: int, trial: Trial, val: dict) -> dict:
        """`trial`'s validation scores after `epoch` (-1: its closed-form start, before any step).
        Returns the scores to record and to choose the best epoch by (their `median_r2`)."""
        return val

    def on_train_end(self, trial: Trial) -> None:
        """After the last epoch: the best trial, its best weights loaded into `trial.model`."""


def _judged(callbacks, epoch: int, trials: list[Trial], scores: list[dict]) -> list[dict]:
    for cb in callbacks:
        scores = [cb.on_validation(epoch, t, v) for t, v in zip(trials, scores, strict=True)]
    return scores


@dataclass
class RunStart:
    """What start_run settled: the device, precision and process group, and the run folder with
    what this run does with it (RunFolder.check's mode; `resume`: it goes on from a checkpoint)."""

    device: torch.device
    amp: torch.dtype | None
    distributed: bool
    main: bool
    folder: RunFolder
    mode: str
    stored: RunSpec | None = None  # the run.json a --resume continues

    @property
    def resume(self) -> bool:
        return self.mode == "continue"

    @property
    def finished(self) -> bool:
        return self.mode == "finished"

    def check_inputs(self, features: FeatureSpec | None, layers: list[str], dataset: str) -> None:
        """A --resume reads what the run was started on: features (trunk weights, preprocessing,
        layers) the run's model.json names, and the same dataset (`dataset_id`); else one line
        naming what differs. Runs from before run.json recorded them are checked on what they have."""
        out, stored = self.folder.out, self.stored
        if stored.dataset is not None and stored.dataset != dataset:
            raise ConfigError(
                f"{out}: --resume with another dataset than the run was started with (--data {stored.data} then); "
                "give the same --data, or --overwrite to start over"
            )
        if features is None:
            return
        spec = stored.features
        if spec is None:
            model = next(iter(sorted(out.glob("model.json")) + sorted(out.glob("*/model.json"))), None)
            spec = read_json(model, error=ConfigError).get("features") if model else None
        if spec is not None:
            diff = features.differences(FeatureSpec.from_dict(spec, str(out / "run.json")), layers)
            if diff:
                raise ConfigError(
                    f"{out}: --resume with other features than the run was started with (cache {stored.cache} "
                    f"then): {'; '.join(diff)} (now vs run); give the same cache, or --overwrite to start over"
                )

    def claim(self) -> None:
        """Make and lock the folder (the main rank), cleared when the run starts over."""
        if self.main:
            self.folder.claim(clear=self.mode == "restart")


def start_run(
    out: Path, configs: list, resume: bool, base, overwrite: bool = False, checkpoint_minutes: float = 10.0
) -> RunStart:
    """Device, precision, process group; the run folder checked (RunFolder.check) and, for a
    --resume, locked and checked to have been started with the same configs. The folder is made
    (`RunStart.claim`) only once the caller's plan is checked: a refused run leaves nothing."""
    for c in configs:
        c.check()
    if not (math.isfinite(checkpoint_minutes) and checkpoint_minutes >= 0):
        raise ConfigError(f"--checkpoint-minutes {checkpoint_minutes}: expected minutes >= 0 (0: every epoch)")
    device = resolve_device(base.device)
    amp = resolve_precision(base.precision, device)
    distributed = init_from_env(device)
    main = is_main()
    folder = RunFolder(out)
    mode = broadcast_object(folder.check(resume, overwrite) if main else None)
    start = RunStart(device, amp, distributed, main, folder, mode)
    if mode == "finished":
        logger.warning("%s: the run finished earlier; left as it is (--overwrite trains it again)", out)
    elif mode in ("new", "restart") and resume:
        logger.warning("%s: no checkpoint was written before the run stopped; starting it over", out)
    elif mode == "continue":
        if main:
            folder.claim()  # before reading what it resumes: a second writer is refused here
        stored = start.stored = RunSpec.read(out / "run.json")
        # keys added since the run started take their defaults (feature_dtype: a run from before it)
        defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default for f in fields(base)}
        diff = _differences([defaults | c for c in stored.configs], [defaults | c.to_dict() for c in configs])
        if diff:
            raise ConfigError(
                f"{out}: --resume with other settings than the run was started with: {diff} (run vs now); "
                "resume with the same options, or --overwrite to start over"
            )
    barrier()
    return start


def _differences(stored: list[dict], now: list[dict]) -> str:
    if len(stored) != len(now):
        return f"{len(stored)} vs {len(now)} configs"
    for k, (a, b) in enumerate(zip(stored, now, strict=True)):
        keys = [key for key in dict.fromkeys([*a, *b]) if a.get(key) != b.get(key)]
        if keys:
            where = f"config {k}: " if len(stored) > 1 else ""
            return where + ", ".join(f"{key} {a.get(key)!r} vs {b.get(key)!r}" for key in keys)
    return ""


def finished_summary(out: Path) -> dict:
    """A finished run's summary as it was written (a --resume of it changes nothing)."""
    return read_json(out / "summary.json", error=ConfigError)


def finish_run(out: Path) -> None:
    """Record in run.json that the run ended; what finished_summary then returns is final."""
    run = out / "run.json"
    replace(RunSpec.read(run), finished=datetime.now(timezone.utc).isoformat(timespec="seconds")).write(run)


def add_trial(
    trials: list,
    name: str,
    tdir: Path,
    cfg,
    model: torch.nn.Module,
    layer_idx: list[int],
    spec: ModelSpec,
    total_steps: int,
    device,
    distributed: bool,
    main: bool,
) -> Trial:
    """Set up a trial's optimizer and schedule (DDP-wrapped under torchrun) and write its config files."""
    trial = Trial(name, cfg, model, layer_idx, keep_embedding=not spec.pca)
    trial.setup(total_steps, device, seed_offset=rank() if distributed else 0)
    if distributed:  # gradients averaged across ranks; each rank trains on its slice of every batch
        trial.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if main:
        tdir.mkdir(exist_ok=True)
        spec.write(tdir / "model.json")
        (tdir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    trials.append((trial, tdir))
    return trial


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
    callbacks: Sequence[Callback] = (),
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
    position = restore_trials(trials) if resume else (0, 0)  # (epoch, batches of it done)
    if not resume:
        _validate_starts(trials, data, base, device, amp, callbacks)
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
                    _train_batch(trials, feats, subject, r, q, data, device, amp, epoch, callbacks)
                    done += 1
                    position, consistent = (epoch, done), True
                    n_epoch += len(subject) * world_size()
                    bar.update(task, advance=1)
                    if stop.check():
                        raise KeyboardInterrupt
                train_s = time.perf_counter() - t_epoch
                samples += n_epoch
                consistent = False
                records = _validate(trials, data, base, device, amp, epoch, callbacks)
                _early_stop(trials, epoch)
                if halving and epoch in rungs:
                    _halve(trials, epoch, halving, rungs[epoch])
                last = epoch == base.epochs - 1 or not any(t.active for t, _ in trials)
                due = last or time.perf_counter() - last_write >= 60 * checkpoint_minutes
                for trial, tdir in trials:
                    # a trial stopped earlier is written once more if it changed since its last write
                    dirty = trial.active or not trial.best.written or trial.written_step != trial.step
                    written = write_checkpoint(trial, tdir, (epoch + 1, 0)) if due and main and dirty else 0
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
                best = max(trials, key=lambda t: t[0].best.score)[0]
                bar.update(task, status=f"epoch {epoch + 1}/{base.epochs} best val median R² {best.best.score:.4f}")
                if stop.check():
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if main and consistent:
                for trial, tdir in trials:
                    write_checkpoint(trial, tdir, position)
                logger.warning("interrupted: state saved at epoch %d, batch %d; --resume goes on from there", *position)
            elif main:
                logger.warning("interrupted inside a step: --resume goes on from the last checkpoint")
            raise
    seconds = time.perf_counter() - t0
    barrier()
    if not main:
        return None
    summary, best_trial, _ = _summarize(out, trials, seconds, samples)
    load_state(best_trial.model, best_trial.best.state)
    for cb in callbacks:
        cb.on_train_end(best_trial)
    [pred] = val_predictions([best_trial], data, base.batch_size, device, amp)
    summary["val_rois"] = save_validation(out, pred, data, summary["trial"])
    write_json(out / "summary.json", summary)
    return summary


def _train_batch(trials, feats, subject, r, q, data, device, amp, epoch: int, callbacks) -> None:
    """One optimizer step of every active trial on one batch (this rank's slice under torchrun)."""
    if world_size() > 1:
        sl = slice(rank(), None, world_size())
        feats, subject, r, q = [f[sl] for f in feats], subject[sl], r[sl], q[sl]
    for trial, _ in trials:
        if not trial.active:
            continue
        loss = train_step(trial, feats, subject, r, q, data.targets, device, amp)
        for cb in callbacks:
            cb.on_step_end(trial, loss)
        trial.epoch_losses.append(loss)
        if not math.isfinite(loss):
            trial.failed = f"loss became {loss} at epoch {epoch}, step {trial.step}"
            logger.error("%s: %s; its best checkpoint (epoch %d) is kept", trial.name, trial.failed, trial.best.epoch)
            if trial.best.state is not None:  # its weights go back to the best epoch's: no NaN written
                load_state(trial.model, trial.best.state)


@timed("validation")
def _validate(trials, data, base, device, amp, epoch: int, callbacks) -> dict[int, dict]:
    """Validate the trials still training (one pass over the data for all) and bring each one's
    record, best score and best weights up to date: {id(trial): record} for this epoch."""
    running = [t for t, _ in trials if t.active]
    scores = evaluate_trials(running, data, base.batch_size, device, amp) if running else []
    scores = _judged(callbacks, epoch, running, scores)
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
            if record["val"]["median_r2"] > trial.best.score:
                weights = trained_state(trial.model, trial.keep_embedding)
                trial.best.update(record["val"]["median_r2"], epoch, record["val"], weights)
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
    ranked = sorted(racing, key=lambda t: -t.best.score)  # stable: ties keep the trial order
    for place, trial in enumerate(ranked[keep:], start=keep + 1):
        if not trial.stopped:
            trial.stopped = f"halving after epoch {epoch}: rank {place} of {len(racing)} (best {trial.best.score:.4f})"
            logger.info("%s: %s", trial.name, trial.stopped)


def _validate_starts(trials, data, base, device, amp, callbacks) -> None:
    """Validate the closed-form starts (config `init`) before any step: a start is the best weights
    until an epoch beats it (best_epoch -1), so training can only improve on it."""
    starts = [t for t, _ in trials if t.validate_start]
    if not starts:
        return
    scores = _judged(callbacks, -1, starts, evaluate_trials(starts, data, base.batch_size, device, amp))
    for trial, val in zip(starts, scores, strict=True):
        trial.start_val = val
        if val["median_r2"] > trial.best.score:
            trial.best.update(val["median_r2"], -1, val, trained_state(trial.model, trial.keep_embedding))


def _early_stop(trials, epoch: int) -> None:
    """Stop the trials whose validation score has not improved for `patience` epochs."""
    for trial, _ in trials:
        patience = trial.config.patience
        if trial.active and patience and epoch - trial.best.epoch >= patience:
            trial.stopped = f"early stop after epoch {epoch}: no better validation score in {patience} epochs"
            logger.info("%s: %s (best: epoch %d)", trial.name, trial.stopped, trial.best.epoch)


def _summarize(out: Path, trials, seconds: float, samples: int) -> tuple[dict, Trial, Path]:
    """The run summary (the best trial's, plus every trial's row) and the best trial with its folder."""
    ranked = sorted(trials, key=lambda t: t[0].best.score, reverse=True)
    rows = [
        {
            "trial": t.name,
            "dir": str(d.relative_to(out)) if d != out else ".",
            "config": t.config.to_dict(),
            "best_epoch": t.best.epoch,
            "median_r2": t.best.score,
            "failed": t.failed,
            "stopped": t.stopped,
            "epochs": len(t.history),
            "steps": t.step,
            "start_median_r2": t.start_val["median_r2"] if t.start_val else None,
        }
        for t, d in ranked
    ]
    if all(t.failed for t, _ in trials) and not any(math.isfinite(t.best.score) for t, _ in trials):
        raise TrainingError(f"{out}: every trial stopped: {trials[0][0].failed}")
    if not any(math.isfinite(t.best.score) for t, _ in trials):
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
