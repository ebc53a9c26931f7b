"""Run-directory files: safetensors weights, JSON configs, training state. No pickles."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blobenc.errors import ConfigError, ModelError
from blobenc.files import atomic_path, read_json

RUN_FORMAT = "blobenc.run"  # model.json / run.json of every run folder
PCA_FILE = "pca.safetensors"  # the run's group PCA: the frozen embedding, stored once per run


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> int:
    """Write atomically: a crash mid-write never leaves a truncated checkpoint behind. Returns the bytes written."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
        size = tmp.stat().st_size
    return size


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


def pca_path(tdir: Path, spec: dict) -> Path | None:
    """The PCA file a trial folder's checkpoints take their embedding from (model.json `pca`,
    relative to the folder); None for runs whose checkpoints hold it."""
    return tdir / spec["pca"] if spec.get("pca") else None


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
