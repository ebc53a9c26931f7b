"""The head-training config: the reference's keys, YAML files, `--set` overrides and `--sweep` grids."""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import yaml

from blobenc.errors import ConfigError

INITS = ("random", "ridge", "pca-ridge")  # the head's starts (blobenc/train/init.py)
FEATURE_DTYPES = ("cache", "int8")  # how fit-head holds features in memory (train/data.CachedFeatures)
REGIONS = ("kmeans", "rois")  # how the query-readout head assigns targets to queries (blobenc/query_readout.py)


@dataclass(frozen=True)
class HeadConfig:
    """Phase-1 defaults: the reference configuration (docs/model.md), except where measurements at small
    data sizes said otherwise (docs/fit-head.md). `epochs` and `batch_size` left None are derived
    from the number of training samples (`resolve_schedule`)."""

    head: str = "group_linear"
    layers: tuple[str, ...] | None = None  # a subset of the cache's layers; None = all of them
    epochs: int | None = None  # None: from the training samples (40 at the reference's ~75k)
    batch_size: int | None = None  # None: from the training samples (512 at the reference's ~75k)
    lr: float = 2e-3  # reference: 6e-4
    weight_decay: float = 0.8
    dropout: float = 0.5  # reference: 0.9
    hidden_dim: int = 256  # reference: 1024
    queries: int = 32  # head query_readout: its queries (blobenc/query_readout.py)
    depth: int = 1  # head query_readout: its cross-attention blocks
    regions: str = "kmeans"  # head query_readout: targets to queries by k-means, or rois (a query per ROI and hemi)
    proj_dim: int | None = None  # = group-PCA components; None: from the training samples (2048 at ~75k)
    pca_samples: int = 16000  # the group PCA is fitted on at most this many training samples (seeded draw)
    feature_dtype: str = "cache"  # features in memory as the cache stores them, or int8 (half of float16)
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.05
    grad_clip: float | None = None
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    patience: int | None = None  # stop after this many epochs without a better validation score
    init: str = "pca-ridge"  # the head's start: random (the reference's), ridge or pca-ridge (train/init.py)
    val_fraction: float = 0.1
    seed: int = 0  # the validation split, the data order and (unless init_seed) the head's init
    init_seed: int | None = None  # the head's random init and dropout (None: seed); ensembles vary it
    device: str = "auto"
    precision: str = "auto"

    def check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name}={value}: expected a finite number")
        positive = (
            *("epochs", "batch_size", "lr", "hidden_dim", "proj_dim", "patience", "pca_samples"),
            *("queries", "depth"),
        )
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name}={value}: expected a positive value")
        for name in ("dropout", "warmup_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a fraction in [0, 1)")
        if not 0 <= self.min_lr_fraction <= 1:
            raise ConfigError(f"min_lr_fraction={self.min_lr_fraction}: expected a fraction in [0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction}: expected a fraction in (0, 1)")
        if self.weight_decay < 0 or (self.grad_clip is not None and self.grad_clip <= 0):
            raise ConfigError("weight_decay must be >= 0 and grad_clip > 0 when set")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"feature_dtype={self.feature_dtype!r}: expected one of {', '.join(FEATURE_DTYPES)}")
        if self.regions not in REGIONS:
            raise ConfigError(f"regions={self.regions!r}: expected one of {', '.join(REGIONS)}")
        if self.init not in INITS:
            raise ConfigError(f"init={self.init!r}: expected one of {', '.join(INITS)}")
        if self.accumulate < 1 or (self.batch_size is not None and self.accumulate > self.batch_size):
            raise ConfigError(f"accumulate={self.accumulate}: expected 1 to batch_size={self.batch_size}")

    def to_dict(self) -> dict:
        """Plain types only (lists, not tuples): what YAML, JSON and resume comparisons see."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class FinetuneConfig(HeadConfig):
    """Phase-2 defaults (docs/model.md): lr 1e-5, 6 epochs, batch 192, min lr 0, attention blocks unfrozen
    (`auto`: a trunk without them, a CNN, trains its deepest cached stage)."""

    epochs: int = 6
    batch_size: int = 192
    lr: float = 1e-5
    min_lr_fraction: float = 0.0
    unfreeze: tuple[str, ...] = ("auto",)  # trunk parameter globs made trainable...
    freeze: tuple[str, ...] = ()  # ...then these frozen again (every norm layer stays frozen regardless: docs/model.md)
    crop_scale: float = 0.8
    grad_checkpointing: bool = False
    num_workers: int | None = None
    # the head and the validation split come from the fit-head run: these keys would be ignored
    FROM_RUN: ClassVar[tuple[str, ...]] = (
        "head",
        "layers",
        "hidden_dim",
        "queries",
        "depth",
        "regions",
        "proj_dim",
        "dropout",
        "val_fraction",
        "init",
    )
    # images stream through the trunk: the cached features' keys do not apply
    NOT_USED: ClassVar[tuple[str, ...]] = ("feature_dtype", "pca_samples")

    def check(self) -> None:
        super().check()
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"crop_scale={self.crop_scale}: expected a fraction in (0, 1]")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers}: expected 0 (load in the main process) or more")


def _fields(cls) -> dict:
    """The keys a config file or --set may give (not those `cls` takes from elsewhere)."""
    skip = (*getattr(cls, "FROM_RUN", ()), *getattr(cls, "NOT_USED", ()))
    return {f.name: f for f in fields(cls) if f.name not in skip}


FIELDS = _fields(HeadConfig)
# Keys that set the shared data order; a one-pass sweep cannot vary them.
NOT_SWEEPABLE = (
    "batch_size",
    "epochs",
    "seed",
    "val_fraction",
    "proj_dim",
    "pca_samples",
    "feature_dtype",
    "device",
    "precision",
    "head",
)


def _coerce(key: str, value, cls=HeadConfig):
    """Check and convert one value to the type of config field `key`."""
    valid = _fields(cls)
    if key in getattr(cls, "FROM_RUN", ()):
        raise ConfigError(
            f"config key {key!r}: finetune takes it from the fit-head run; valid keys: {', '.join(valid)}"
        )
    if key in getattr(cls, "NOT_USED", ()):
        raise ConfigError(f"config key {key!r}: finetune reads images, not cached features; it does not apply")
    if key not in valid:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
    hint = typing.get_type_hints(cls)[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required")
    if typing.get_origin(base) is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{key}={value!r}: expected a list of strings")
        return tuple(items)
    if base is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected float") from None
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: expected {base.__name__}")
    return value


def parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def runtime_overrides(device: str, precision: str) -> list[str]:
    """--device/--precision as config overrides, only when given: a config file's values stand otherwise."""
    return [f"{k}={v}" for k, v in (("device", device), ("precision", precision)) if v != "auto"]


# A head's own defaults for keys every head shares, where measurements chose other values than the
# group-linear head's (docs/fit-head.md, "The query-readout head"); a config file or --set stands.
HEAD_DEFAULTS: dict[str, dict] = {"query_readout": {"hidden_dim": 128, "lr": 3e-3, "dropout": 0.0}}


def load_config(path: Path | None = None, overrides: list[str] = (), cls=HeadConfig) -> HeadConfig:
    """Defaults (the head's own, HEAD_DEFAULTS), then a YAML file of reference keys, then `key=value`
    overrides; checked."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        values.update(loaded)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        values[key.strip()] = parse_value(text)
    if "head" in _fields(cls):
        for key, value in HEAD_DEFAULTS.get(values.get("head", cls.head), {}).items():
            values.setdefault(key, value)
    config = cls(**{k: _coerce(k, v, cls) for k, v in values.items()})
    config.check()
    return config


# The schedule fit-head derives when a config leaves `epochs` / `batch_size` unset, chosen from
# measurements at several data sizes (docs/fit-head.md). At the reference's scale (~75k samples)
# it is the reference's: batch 512, 40 epochs.
REFERENCE_BATCH = 512
REFERENCE_EPOCHS = 40
BATCH_FRACTION = 1 / 32  # batch: this fraction of the training samples, as a power of 2...
MIN_BATCH = 32  # ...in [MIN_BATCH, REFERENCE_BATCH]
MIN_STEPS = 300  # optimizer steps of a run at least: small data needs many epochs
REFERENCE_PROJ = 2048
PROJ_FRACTION = 1 / 8  # group-PCA components: this fraction of the training samples, to a multiple of 64...
MIN_PROJ = 64  # ...in [MIN_PROJ, REFERENCE_PROJ]


def default_batch_size(n_train: int) -> int:
    """A power of 2 near BATCH_FRACTION of the training samples, in [MIN_BATCH, REFERENCE_BATCH]
    (and at most half the samples, so that an epoch is at least two steps)."""
    target = min(max(n_train * BATCH_FRACTION, MIN_BATCH), REFERENCE_BATCH, max(n_train // 2, 2))
    return 1 << math.floor(math.log2(target))


def default_epochs(n_train: int, batch_size: int) -> int:
    """Epochs for max(MIN_STEPS, the reference's steps at this size: 40 epochs of batch 512) steps."""
    steps = max(MIN_STEPS, REFERENCE_EPOCHS * math.ceil(n_train / REFERENCE_BATCH))
    return max(1, round(steps / math.ceil(n_train / batch_size)))


def default_proj_dim(n_train: int) -> int:
    """Group-PCA components: PROJ_FRACTION of the training samples (the nearest multiple of 64), in
    [MIN_PROJ, REFERENCE_PROJ]. With few samples the trailing components are noise the head would
    fit; the reference's 2048 is reached at ~16k samples."""
    return int(min(REFERENCE_PROJ, max(MIN_PROJ, round(n_train * PROJ_FRACTION / 64) * 64)))


def resolve_schedule(config: HeadConfig, n_train: int) -> HeadConfig:
    """`config` with what depends on the data size filled in from `n_train` training samples where
    it is None: `batch_size`, `epochs` (the schedule) and `proj_dim`. Values a config file or --set
    gave stand."""
    if n_train < 2:
        raise ConfigError(f"{n_train} training samples: at least 2 are needed")
    batch = config.batch_size or default_batch_size(n_train)
    resolved = replace(
        config,
        batch_size=batch,
        epochs=config.epochs or default_epochs(n_train, batch),
        proj_dim=config.proj_dim or default_proj_dim(n_train),
    )
    resolved.check()
    return resolved


def sweep_configs(base: HeadConfig, sweeps: list[str]) -> list[HeadConfig]:
    """The Cartesian product of `key=v1,v2,...` grids over `base`."""
    grid: dict[str, list] = {}
    for item in sweeps:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not text:
            raise ConfigError(f"--sweep {item!r}: expected key=v1,v2,...")
        if key in NOT_SWEEPABLE:
            raise ConfigError(
                f"--sweep {key}: sets the shared data order; sweepable keys: "
                f"{', '.join(k for k in FIELDS if k not in NOT_SWEEPABLE)}"
            )
        if key == "layers":
            values = [tuple(v.split("+")) for v in text.split(",")]  # layers=blocks.0+blocks.2,blocks.4
        else:
            values = [parse_value(v) for v in text.split(",")]
        grid[key] = [_coerce(key, v) for v in values]
    configs = [replace(base, **dict(zip(grid, combo, strict=True))) for combo in itertools.product(*grid.values())]
    for c in configs:
        c.check()
    return configs


# What `--search N` samples when no --sweep gives the space: around the defaults, log scales
SEARCH_SPACE = ("lr=1e-4:3e-3", "weight_decay=0.01:1", "dropout=0.1:0.9")


def search_configs(base: HeadConfig, space: list[str], n: int) -> tuple[list[HeadConfig], dict]:
    """`n` configs drawn over `space` (`key=lo:hi` a range, log-scaled when lo > 0 and hi/lo >= 10;
    `key=v1,v2,...` a choice; default SEARCH_SPACE) by optuna's quasi-random (Sobol) sampler, seeded
    by `base.seed`: spread evenly, all chosen up front, as a one-pass search needs. Returns the
    configs and the optuna distributions they were drawn from."""
    import optuna

    if n < 1:
        raise ConfigError(f"--search {n}: expected at least 1 config")
    distributions = {}
    for item in space or SEARCH_SPACE:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not text:
            raise ConfigError(f"--sweep {item!r}: expected key=lo:hi or key=v1,v2,...")
        if key in NOT_SWEEPABLE or key not in FIELDS:
            searchable = ", ".join(k for k in FIELDS if k not in NOT_SWEEPABLE)
            raise ConfigError(f"--sweep {key}: not a searchable key; searchable: {searchable}")
        if ":" in text:
            lo, hi = (_coerce(key, parse_value(v)) for v in text.split(":", 1))
            if not isinstance(lo, (int, float)) or not lo < hi:
                raise ConfigError(f"--sweep {item!r}: a range needs numbers lo < hi")
            log = lo > 0 and hi / lo >= 10
            dist = (
                optuna.distributions.IntDistribution if isinstance(lo, int) else optuna.distributions.FloatDistribution
            )
            distributions[key] = dist(lo, hi, log=log)
        else:
            choices = [tuple(v.split("+")) if key == "layers" else parse_value(v) for v in text.split(",")]
            distributions[key] = optuna.distributions.CategoricalDistribution(
                [_coerce(key, v) for v in choices] if key != "layers" else ["+".join(c) for c in choices]
            )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.QMCSampler(seed=base.seed, scramble=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    configs = []
    for _ in range(n):
        params = study.ask(distributions).params
        if "layers" in params:
            params["layers"] = tuple(params["layers"].split("+"))
        config = replace(base, **params)
        config.check()
        configs.append(config)
    return configs, distributions
