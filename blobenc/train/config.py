"""The head-training config: the reference's keys, YAML files, `--set` overrides and `--sweep` grids."""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path

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
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def check(self) -> None:
        positive = ("epochs", "batch_size", "lr", "hidden_dim", "proj_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: expected a positive value")
        for name in ("dropout", "warmup_fraction", "min_lr_fraction"):
            if not 0 <= getattr(self, name) < 1 + (name == "min_lr_fraction"):
                raise ConfigError(f"{name}={getattr(self, name)}: expected a fraction in [0, 1)")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction}: expected a fraction in (0, 1)")
        if self.weight_decay < 0 or (self.grad_clip is not None and self.grad_clip <= 0):
            raise ConfigError("weight_decay must be >= 0 and grad_clip > 0 when set")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


FIELDS = {f.name: f for f in fields(HeadConfig)}
# Keys that set the shared data order; a one-pass sweep cannot vary them.
NOT_SWEEPABLE = ("batch_size", "epochs", "seed", "val_fraction", "proj_dim", "device", "precision", "head")


def _coerce(key: str, value):
    """Check and convert one value to the type of HeadConfig field `key`."""
    if key not in FIELDS:
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(FIELDS)}")
    hint = typing.get_type_hints(HeadConfig)[key]
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


def load_config(path: Path | None = None, overrides: list[str] = ()) -> HeadConfig:
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
    config = HeadConfig(**{k: _coerce(k, v) for k, v in values.items()})
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
