"""Run-directory files: safetensors weights, JSON configs, and the training state a trial writes and
--resume restores. No pickles."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save

from blobenc.errors import BlobencError, ConfigError, ModelError
from blobenc.features.spec import FeatureSpec
from blobenc.files import atomic_path, read_json, write_json
from blobenc.profile import timed
from blobenc.train.step import Trial

logger = logging.getLogger(__name__)

RUN_FORMAT = "blobenc.run"  # model.json / run.json of every run folder
MODEL_VERSION = 1  # model.json's and run.json's layout (ModelSpec, RunSpec); files before it carried none
PCA_FILE = "pca.safetensors"  # the run's group PCA: the frozen embedding, stored once per run


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> int:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind. Returns the bytes written."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    # serialized in memory, written by Python: a full or read-only disk is an OSError naming the
    # file (safetensors' own writer raises an error that names neither)
    data = save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return len(data)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors checkpoint; a missing, truncated or foreign file is one ConfigError line."""
    from safetensors import SafetensorError

    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors checkpoint (truncated or corrupted?): {e}") from None


def embedding_keys(model: torch.nn.Module) -> list[str]:
    """State-dict names of the frozen group-PCA embedding(s) in `model` (`embed.*` of every head
    with `set_embedding`, e.g. `head.embed.weight` in a finetune encoder)."""
    keys = []
    for prefix, module in model.named_modules():
        if hasattr(module, "set_embedding"):
            keys += [f"{prefix}.embed.{name}".lstrip(".") for name in ("weight", "bias")]
    return keys


def trained_state(model: torch.nn.Module, embedding: bool = False) -> dict[str, torch.Tensor]:
    """The state dict a checkpoint holds: everything but the frozen embedding, which the run's PCA
    file holds once (V x P floats: 324 of the 419 MB of a reference-size head). With `embedding`
    (a run with no PCA file, e.g. a finetune of an imported reference head) the embedding is kept."""
    skip = set() if embedding else set(embedding_keys(model))
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], pca: Path | None = None) -> None:
    """Load a checkpoint into `model`, strictly. The embedding comes from the checkpoint when it
    holds one (imports, runs written before lean checkpoints), else from the PCA file `pca`, else
    it stays as the model has it (a resumed run, whose model was built from its PCA)."""
    state = dict(state)
    missing = [k for k in embedding_keys(model) if k not in state]
    if missing and pca is not None:
        from blobenc.pca import GroupPCA

        fitted = GroupPCA.load(pca)
        weight, bias = torch.from_numpy(fitted.components_).T, torch.from_numpy(fitted.mean_)
        for key in missing:
            state[key] = weight if key.endswith("weight") else bias
    elif missing:
        own = model.state_dict()
        state |= {k: own[k] for k in missing}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ModelError(f"checkpoint does not fit the model rebuilt from model.json ({first})") from None


@dataclass
class ModelSpec:
    """model.json: what rebuilds a run's fitted model from its folder alone, for every kind of run.

    `kind` "head": a registered head (`head`, built with `kwargs`) trained by fit-head (`start`: its
    closed-form start), fine-tuned with its trunk (`finetuned`, `finetune`: from where, what was
    unfrozen) or imported from the reference release (`imported`); its frozen embedding is the
    run's PCA file (`pca`, relative to the trial folder) or in its checkpoints. `kind` "ridge": one
    fit per subject in `weights/` (`ridge`: the features' reduction, banded, refit). Every kind:
    the `subjects` it predicts, the cached `layers` it reads and their `features` (FeatureSpec),
    the `cache` it was fitted on, the `group` space (GroupSpace.to_dict). `ensemble`: the member
    folders when loaded from an ensemble run (not written)."""

    kind: str
    subjects: list[str]
    layers: list[str]
    features: FeatureSpec
    cache: str | None = None
    group: dict | None = None
    head: str | None = None
    kwargs: dict | None = None
    pca: str | None = None
    start: dict | None = None
    finetuned: bool = False
    finetune: dict | None = None
    imported: dict | None = None
    ridge: dict | None = None
    ensemble: list[str] | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("head", "ridge")

    def to_dict(self) -> dict:
        out: dict = {"format": RUN_FORMAT, "version": MODEL_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "ensemble" or value is None or value is False:
                continue
            out[f.name] = value.to_dict() if isinstance(value, FeatureSpec) else value
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str) -> ModelSpec:
        if d.get("format", RUN_FORMAT) != RUN_FORMAT:
            raise ModelError(f"{where}: format {d.get('format')!r}, expected {RUN_FORMAT!r}")
        version = d.get("version", 1)
        if not isinstance(version, int) or version > MODEL_VERSION:
            raise ModelError(f"{where}: model format version {version!r}; this blobenc reads up to {MODEL_VERSION}")
        kind = d.get("kind", "head")  # fit-head runs wrote no kind before version 1
        if kind not in cls.KINDS:
            raise ModelError(f"{where}: kind {kind!r}, expected one of {', '.join(cls.KINDS)}")
        missing = [k for k in ("subjects", "layers", "features") if k not in d]
        if kind == "head":
            missing += [k for k in ("head", "kwargs") if k not in d]
        if missing:
            raise ModelError(f"{where}: no {missing[0]!r}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known} | {"kind": kind}
        return cls(**values | {"features": FeatureSpec.from_dict(d["features"], where)})

    @classmethod
    def read(cls, path: Path) -> ModelSpec:
        return cls.from_dict(read_json(path, error=ModelError), str(path))

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    def pca_path(self, tdir: Path) -> Path | None:
        """The PCA file a trial folder's checkpoints take their embedding from (`pca`, relative to
        the folder); None for runs whose checkpoints hold it."""
        return tdir / self.pca if self.pca else None


@dataclass
class RunSpec:
    """run.json: how a run was made. `kind` fit-head, fit-ridge or finetune; the `data` root, the
    `cache` it read (finetune: `source`, the fit-head run it started from, "from" in the file),
    the `configs` as given (fit-head: `resolved`, with the schedule derived from the data size), the
    `command` line; fit-head also the training samples and its group PCA's size and explained
    variance; the `features` it read (FeatureSpec.to_dict) and the `dataset` (dataset_id), which
    --resume compares with the new ones, as it does the configs; `finished`: when the run ended
    (a --resume of it leaves it as it is). The report shows it."""

    kind: str
    data: str
    configs: list[dict]
    cache: str | None = None
    source: str | None = None
    command: str | None = None
    resolved: list[dict] | None = None
    train_samples: int | None = None
    pca_components: int | None = None
    pca_explained_variance: float | None = None
    features: dict | None = None
    dataset: str | None = None
    finished: str | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("fit-head", "fit-ridge", "finetune")

    def to_dict(self) -> dict:
        out: dict = {"format": RUN_FORMAT, "version": MODEL_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out["from" if f.name == "source" else f.name] = value
        return out

    @classmethod
    def read(cls, path: Path, error: type[BlobencError] = ConfigError) -> RunSpec:
        d = read_json(path, error=error)
        if not isinstance(d, dict) or d.get("format") != RUN_FORMAT or d.get("kind") not in cls.KINDS:
            raise error(f"{path}: not a blobenc run.json (format {RUN_FORMAT!r}, kind one of {', '.join(cls.KINDS)})")
        if d.get("version", 1) > MODEL_VERSION:
            raise error(f"{path}: run format version {d['version']!r}; this blobenc reads up to {MODEL_VERSION}")
        known = {f.name for f in fields(cls)} - {"source"}
        values = {k: v for k, v in d.items() if k in known}
        return cls(**values, source=d.get("from"))

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten an optimizer's state dict to tensors + a JSON string (for safetensors)."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{pid}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return tensors, json.dumps(sd["param_groups"])


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: str) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(groups)})


def resolve_run(run: Path | str) -> Path:
    """The trial folder a run or sweep directory stands for (the best trial of a sweep)."""
    run = Path(run)
    if (run / "sweep.json").is_file():
        return run / read_json(run / "sweep.json")["best"]
    if not (run / "model.json").is_file():
        raise ConfigError(f"{run}: not a blobenc run (no model.json or sweep.json)")
    return run


@timed("checkpoint")
def write_checkpoint(trial: Trial, tdir: Path, position: tuple[int, int]) -> int:
    """Write the trial's best weights (when newer than the file), its last weights and its training
    state; returns the bytes written. The state is written last and names the step of the last
    weights, so a crash between the two is detected on resume."""
    written = 0
    if not trial.best.written and trial.best.state is not None:
        meta = {"epoch": trial.best.epoch, "median_r2": trial.best.score}
        written += save_weights(tdir / "best.safetensors", trial.best.state, meta)
        write_json(tdir / "summary.json", {"best_epoch": trial.best.epoch, "val": trial.best.val, "trial": trial.name})
        trial.best.written = True
    state = trained_state(trial.model, trial.keep_embedding)
    written += save_weights(tdir / "last.safetensors", state, {"step": trial.step})
    trial.written_step = trial.step
    tensors, groups = optimizer_state(trial.optimizer)
    tensors["rng_state"] = trial.rng_state
    meta = {
        "epoch": position[0],
        "batch": position[1],
        "step": trial.step,
        "best_score": trial.best.score,
        "best_epoch": trial.best.epoch,
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


def restore_trials(trials) -> tuple[int, int]:
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
        trial.best.score, trial.best.epoch = float(meta["best_score"]), int(meta["best_epoch"])
        status = json.loads(meta["status"])
        trial.failed, trial.stopped = status["failed"], status["stopped"]
        trial.epoch_losses, trial.history = status["epoch_losses"], status["history"]
        trial.start_val = status.get("start_val")
        if math.isfinite(trial.best.score):
            trial.best.state = load_weights(tdir / "best.safetensors")
            trial.best.val = read_json(tdir / "summary.json")["val"]
        positions.add(position := (int(meta["epoch"]), int(meta["batch"])))
        if trial.active:
            active.add(position)
        trial.written_step = trial.step
    if len(active) > 1:  # a stopped trial's state may be older: it trains no more
        raise ConfigError("trials stopped at different positions; cannot resume them in one pass")
    return active.pop() if active else max(positions)
