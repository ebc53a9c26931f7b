"""Run folders (fit-head, finetune, fit-ridge, imports): find the trial a run stands for and rebuild
its model from the folder alone."""

from __future__ import annotations

from pathlib import Path

import torch

from blobenc.data.base import GroupSpace
from blobenc.files import read_json
from blobenc.heads import HeadEnsemble, create_head
from blobenc.train.checkpoint import load_state, load_weights, pca_path, resolve_run
from blobenc.train.ridge import RidgeModel


def load_model(run: Path | str, which: str = "best") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained head from its run folder alone: model.json + <which>.safetensors, the frozen
    embedding from the run's PCA file (model.json `pca`) when the checkpoint does not hold it. A run
    with `ensemble.json` (fit-head --ensemble) gives all its members, averaged (HeadEnsemble)."""
    if (Path(run) / "ensemble.json").is_file():
        return _load_ensemble(Path(run), which)
    tdir = resolve_run(run)
    spec = read_json(tdir / "model.json")
    if spec.get("kind") == "ridge":  # per-subject fits in weights/, loaded as predict asks for them
        return RidgeModel(tdir, spec), spec
    if spec.get("finetuned"):  # trunk + head in one state dict
        from blobenc.train.finetune import build_encoder  # the trunk's timm: only for these runs

        model = build_encoder(spec)
    else:
        model = create_head(spec["head"], **spec["kwargs"])
    load_state(model, load_weights(tdir / f"{which}.safetensors"), pca_path(tdir, spec))
    return model.eval(), spec


def _load_ensemble(run: Path, which: str) -> tuple[torch.nn.Module, dict]:
    """The members ensemble.json names, as one model reading the union of their layers."""
    names = read_json(run / "ensemble.json")["members"]
    members = [load_model(run / d, which) for d in names]
    layers = list(dict.fromkeys(n for _, spec in members for n in spec["layers"]))
    model = HeadEnsemble([m for m, _ in members], [[layers.index(n) for n in spec["layers"]] for _, spec in members])
    return model.eval(), members[0][1] | {"layers": layers, "ensemble": names}


def group_of(spec: dict) -> GroupSpace:
    """The group space a run's model predicts in (model.json `group`, either form)."""
    return GroupSpace.from_dict(spec["group"])
