"""Run-directory files: safetensors weights, JSON configs, training state. No pickles."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blobenc.errors import ConfigError

RUN_FORMAT = "blobenc.run"  # model.json / run.json of every run folder


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors checkpoint; a missing, truncated or foreign file is one ConfigError line."""
    from safetensors import SafetensorError

    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors checkpoint (truncated or corrupted?): {e}") from None


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def read_json(path: Path):
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


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
