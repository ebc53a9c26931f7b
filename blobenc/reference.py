"""Import the reference Algonauts 2023 release: its group PCA and head checkpoint (docs/model.md,
"Compatibility with the reference release")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from blobenc.errors import ModelError
from blobenc.features.cache import FeatureCache
from blobenc.heads import create_head, token_shape
from blobenc.train.checkpoint import ModelSpec, save_weights


def _load(path: Path, what: str) -> dict:
    if not Path(path).is_file():
        raise ModelError(f"{path}: {what} file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code: say so in one line
        raise ModelError(
            f"{path}: not a torch weights file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


def import_reference(
    checkpoint: Path | str,
    pca: Path | str,
    cache: Path | str,
    out: Path | str,
    data: Path | str | None = None,
    layers: list[str] | None = None,
) -> Path:
    """Write a run folder that `predict` uses, reproducing the reference model's outputs exactly."""
    ckpt = _load(Path(checkpoint), "checkpoint")
    if "encoder" not in ckpt:
        raise ModelError(f"{checkpoint}: no 'encoder' state dict (keys: {', '.join(map(str, ckpt))})")
    enc = ckpt["encoder"]
    pca_sd = _load(Path(pca), "PCA")
    if set(pca_sd) < {"weight", "bias"}:
        raise ModelError(f"{pca}: expected a state dict with 'weight' (V, P) and 'bias' (V,)")
    n_vertices, proj_dim = pca_sd["weight"].shape
    if not torch.equal(enc["embed.weight"], pca_sd["weight"]) or not torch.equal(enc["embed.bias"], pca_sd["bias"]):
        raise ModelError(f"{checkpoint}: its embedding differs from the PCA in {pca}")

    n_layers = len({k.split(".")[1] for k in enc if k.startswith("feat_projs.")})
    feats = FeatureCache.open(cache)
    layers = list(layers or feats.layers)
    if len(layers) != n_layers:
        raise ModelError(
            f"the checkpoint has {n_layers} layer projections, the cache {len(layers)} layers "
            f"({', '.join(layers)}); choose {n_layers} with --layers"
        )
    shapes = [feats.attrs["layer_shapes"][n] for n in layers]
    for i, s in enumerate(shapes):
        want = tuple(enc[f"feat_projs.{i}.proj.weight1"].shape[1:]) + tuple(
            enc[f"feat_projs.{i}.proj.weight2"].shape[1:]
        )
        if token_shape(s) != want:
            raise ModelError(
                f"layer {layers[i]} has (tokens, channels) {token_shape(s)}, the checkpoint expects {want}"
            )
    hidden = enc["shared_proj.weight"].shape[1]
    n_subjects = enc["subj_proj.fc.weight"].shape[0] // proj_dim
    kwargs = {
        "layer_shapes": shapes,
        "n_subjects": n_subjects,
        "n_vertices": int(n_vertices),
        "hidden_dim": int(hidden),
        "proj_dim": int(proj_dim),
        "dropout": 0.0,
        "reference_bias_twice": True,
    }
    model = create_head("group_linear", **kwargs)
    model.load_state_dict(enc)  # strict: every key of the reference format, nothing else

    group = None
    if data is not None:
        from blobenc.data import open_dataset

        ds = open_dataset(data)
        if ds.group.n_vertices != n_vertices:
            raise ModelError(f"{data}: group space has {ds.group.n_vertices} vertices, the PCA {n_vertices}")
        group = ds.group.to_dict()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec(
        kind="head",
        head="group_linear",
        kwargs=kwargs,
        subjects=[f"subj{k:02d}" for k in range(1, n_subjects + 1)],
        layers=layers,
        features=feats.feature_spec(),
        cache=str(feats.path),
        group=group,
        imported={
            "checkpoint": str(checkpoint),
            "pca": str(pca),
            "epoch": _scalar(ckpt.get("epoch")),
            "metric": _scalar(ckpt.get("metric")),
        },
    )
    weights = model.state_dict()
    if ckpt.get("trunk") is not None:  # phase 2: the fine-tuned trunk travels with the head
        spec.finetuned = True
        encoder = _finetuned_encoder(ckpt["trunk"], model, spec, checkpoint)
        weights = encoder.state_dict()
    spec.write(out / "model.json")
    save_weights(out / "best.safetensors", weights)
    return out


def _finetuned_encoder(trunk_sd, head: torch.nn.Module, spec: ModelSpec, checkpoint) -> torch.nn.Module:
    """Trunk + head as `predict` runs a finetune run, the trunk's weights from the checkpoint."""
    from blobenc.train.finetune import build_encoder

    if not isinstance(trunk_sd, dict):
        raise ModelError(f"{checkpoint}: 'trunk' is a {type(trunk_sd).__name__}, expected a state dict or None")
    encoder = build_encoder(spec)
    encoder.head.load_state_dict(head.state_dict())
    own = encoder.trunk.state_dict()
    missing, unexpected = sorted(set(own) - set(trunk_sd)), sorted(set(trunk_sd) - set(own))
    if missing or unexpected:
        raise ModelError(
            f"{checkpoint}: its trunk does not fit {spec.features.model} (the cache's trunk): "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for name, value in trunk_sd.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise ModelError(
                f"{checkpoint}: trunk weight {name} has shape {tuple(value.shape)}, "
                f"{spec.features.model} expects {tuple(own[name].shape)}"
            )
    encoder.trunk.load_state_dict(trunk_sd)
    return encoder


def _scalar(x):
    if isinstance(x, torch.Tensor):
        return x.item()
    return x if isinstance(x, (int, float, str)) or x is None else str(x)


def reference_formula(
    enc: dict[str, np.ndarray], feats: list[np.ndarray], subject: int, eps: float = 1e-5
) -> np.ndarray:
    """The reference model in plain numpy (eval mode), for tests: embed(shared(h)) + embed(subj(h))."""
    hs = []
    for i, x in enumerate(feats):
        w1, w2 = enc[f"feat_projs.{i}.proj.weight1"], enc[f"feat_projs.{i}.proj.weight2"]
        y = np.einsum("blc,kl,kc->bk", x, w1, w2)
        mean, var = enc[f"feat_projs.{i}.norm.running_mean"], enc[f"feat_projs.{i}.norm.running_var"]
        y = (y - mean) / np.sqrt(var + eps) * enc[f"feat_projs.{i}.norm.weight"] + enc[f"feat_projs.{i}.norm.bias"]
        hs.append(y)
    h = np.mean(hs, axis=0)
    p = enc["shared_proj.weight"].shape[0]
    w_s = enc["subj_proj.fc.weight"][subject * p : (subject + 1) * p]
    b_s = enc["subj_proj.fc.bias"][subject * p : (subject + 1) * p]
    embed = lambda z: z @ enc["embed.weight"].T + enc["embed.bias"]  # noqa: E731
    return embed(h @ enc["shared_proj.weight"].T) + embed(h @ w_s.T + b_s)
