"""The head-training config: the reference's keys, YAML files, `--set` overrides and `--sweep` grids."""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import yaml

from blobenc.errors import ConfigError


@dataclass(frozen=True)
class HeadConfig:
    """Phase-1 defaults are the reference configuration (SPEC)."""

    head: str = "group_linear"
    layers: tuple[str, ...] | None = None  # a subset of the cache's layers; None = all of them
    epochs: int = 40
    batch_size: int = 512
    lr: float = 6e-4
    weight_decay: float = 0.8
    dropout: float = 0.9
    hidden_dim: int = 1024
    proj_dim: int = 2048  # = group-PCA components (capped by the sample count)
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.05
    grad_clip: float | None = None
    accumulate: int = 1  # micro-batches per optimizer step (gradient accumulation)
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def check(self) -> None:
        positive = ("epochs", "batch_size", "lr", "hidden_dim", "proj_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a positive value")
        for name in ("dropout", "warmup_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a fraction in [0, 1)")
        if not 0 <= self.min_lr_fraction <= 1:
            raise ConfigError(f"min_lr_fraction={self.min_lr_fraction}: expected a fraction in [0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction}: expected a fraction in (0, 1)")
        if self.weight_decay < 0 or (self.grad_clip is not None and self.grad_clip <= 0):
            raise ConfigError("weight_decay must be >= 0 and grad_clip > 0 when set")
        if self.accumulate < 1 or self.accumulate > self.batch_size:
            raise ConfigError(f"accumulate={self.accumulate}: expected 1 to batch_size={self.batch_size}")

    def to_dict(self) -> dict:
        """Plain types only (lists, not tuples): what YAML, JSON and resume comparisons see."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class FinetuneConfig(HeadConfig):
    """Phase-2 defaults (SPEC): lr 1e-5, 6 epochs, batch 192, min lr 0, attention blocks unfrozen."""

    epochs: int = 6
    batch_size: int = 192
    lr: float = 1e-5
    min_lr_fraction: float = 0.0
    unfreeze: tuple[str, ...] = ("blocks.*.attn.**",)  # trunk parameter globs made trainable...
    freeze: tuple[str, ...] = ("**norm**",)  # ...then these frozen again (SPEC: every norm stays frozen)
    crop_scale: float = 0.8
    grad_checkpointing: bool = False
    num_workers: int | None = None
    # the head and the validation split come from the fit-head run: these keys would be ignored
    FROM_RUN: ClassVar[tuple[str, ...]] = ("head", "layers", "hidden_dim", "proj_dim", "dropout", "val_fraction")

    def check(self) -> None:
        super().check()
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"crop_scale={self.crop_scale}: expected a fraction in (0, 1]")


def _fields(cls) -> dict:
    """The keys a config file or --set may give (not those `cls` takes from elsewhere)."""
    return {f.name: f for f in fields(cls) if f.name not in getattr(cls, "FROM_RUN", ())}


FIELDS = _fields(HeadConfig)
# Keys that set the shared data order; a one-pass sweep cannot vary them.
NOT_SWEEPABLE = ("batch_size", "epochs", "seed", "val_fraction", "proj_dim", "device", "precision", "head")


def _coerce(key: str, value, cls=HeadConfig):
    """Check and convert one value to the type of config field `key`."""
    valid = _fields(cls)
    if key in getattr(cls, "FROM_RUN", ()):
        raise ConfigError(
            f"config key {key!r}: finetune takes it from the fit-head run; valid keys: {', '.join(valid)}"
        )
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


def load_config(path: Path | None = None, overrides: list[str] = (), cls=HeadConfig) -> HeadConfig:
    """Defaults, then a YAML file of reference keys, then `key=value` overrides; checked."""
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
    config = cls(**{k: _coerce(k, v, cls) for k, v in values.items()})
    config.check()
    return config


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
