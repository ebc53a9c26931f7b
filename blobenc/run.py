"""Run folders (fit-head, finetune, fit-ridge, imports): find the trial a run stands for and rebuild
its model from the folder alone."""

from __future__ import annotations

from pathlib import Path

import torch

from blobenc.data.base import GroupSpace
from blobenc.heads import create_head
from blobenc.train.checkpoint import load_weights, read_json, resolve_run
from blobenc.train.finetune import build_encoder
from blobenc.train.ridge import RidgeModel


def load_model(run: Path | str, which: str = "best") -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained head from its run folder alone: model.json + <which>.safetensors."""
    tdir = resolve_run(run)
    spec = read_json(tdir / "model.json")
    if spec.get("kind") == "ridge":  # per-subject fits in weights/, loaded as predict asks for them
        return RidgeModel(tdir, spec), spec
    if spec.get("finetuned"):  # trunk + head in one state dict
        model = build_encoder(spec)
    else:
        model = create_head(spec["head"], **spec["kwargs"])
    model.load_state_dict(load_weights(tdir / f"{which}.safetensors"))
    return model.eval(), spec


def group_of(spec: dict) -> GroupSpace:
    """The group space a run's model predicts in (model.json `group`, either form)."""
    return GroupSpace.from_dict(spec["group"])
