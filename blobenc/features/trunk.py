"""timm trunks: build (seeded, pretrained or from a local file), fingerprint, pick layers, capture them."""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from blobenc.defaults import DEFAULT_MODEL
from blobenc.errors import CacheError, ModelError


@dataclass(frozen=True)
class TrunkSpec:
    """Everything needed to rebuild the same trunk later (stored with caches and runs)."""

    model: str = DEFAULT_MODEL
    pretrained: bool = True
    weights: str | None = None
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def create_trunk(spec: TrunkSpec) -> nn.Module:
    """Build a timm model in eval mode; random init is seeded so it can be rebuilt bit for bit."""
    torch.manual_seed(spec.seed)
    try:
        model = timm.create_model(spec.model, pretrained=spec.pretrained and spec.weights is None)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            close = difflib.get_close_matches(spec.model, timm.list_models(pretrained=False), n=5, cutoff=0.6)
            hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
            raise ModelError(f"--model {spec.model!r} is not a timm model{hint}") from None
        raise
    except OSError as e:  # huggingface_hub's offline and connection errors are OSErrors
        raise ModelError(
            f"cannot download pretrained weights for {spec.model!r} ({type(e).__name__}); offline? "
            "use --weights FILE for a local checkpoint or --no-pretrained for random init"
        ) from None
    if spec.weights is not None:
        path = Path(spec.weights)
        if not path.is_file():
            raise ModelError(f"--weights {path}: file not found")
        try:
            timm.models.load_checkpoint(model, str(path), strict=True, weights_only=True)
        except (RuntimeError, OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise ModelError(f"--weights {path}: does not fit {spec.model!r} ({first})") from None
    return model.eval()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): same weights, same fingerprint."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d buffers cannot be byte-viewed
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def preprocessing(model: nn.Module) -> dict:
    """timm's data config for the model (input size, mean, std, interpolation, crop), JSON-ready."""
    cfg = timm.data.resolve_model_data_config(model)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def eval_transform(prep: dict) -> transforms.Compose:
    return timm.data.create_transform(**prep, is_training=False)


def augment_transform(prep: dict, crop_scale: float) -> transforms.Compose:
    """Random resized crop (scale [crop_scale, 1], square, model interpolation), then normalize."""
    size = prep["input_size"][-2:]
    interp = transforms.InterpolationMode(prep["interpolation"])
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(crop_scale, 1.0), ratio=(1.0, 1.0), interpolation=interp),
            transforms.ToTensor(),
            transforms.Normalize(prep["mean"], prep["std"]),
        ]
    )


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _glob_regex(pattern: str) -> re.Pattern:
    """Module names are dotted paths: `*` and `?` stay within one name, `**` crosses dots, `[..]` is a class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j]
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def match_modules(names: Sequence[str], pattern: str) -> list[str]:
    regex = _glob_regex(pattern)
    return [n for n in names if regex.match(n)]


def resolve_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Expand glob patterns over module names, in model order; a pattern that matches nothing is an error."""
    if not patterns:
        raise ModelError("no --layers given; `blobenc layers MODEL` lists the module names")
    names = module_names(model)
    selected: set[str] = set()
    for pattern in patterns:
        hits = match_modules(names, pattern)
        if not hits:
            close = difflib.get_close_matches(pattern, names, n=6, cutoff=0.5)
            hint = f"; similar: {', '.join(close)}" if close else "; `blobenc layers MODEL` lists them"
            raise ModelError(f"--layers {pattern!r} matches no module{hint}")
        selected.update(hits)
    return [n for n in names if n in selected]


class _StopForward(Exception):
    pass


class LayerCapture:
    """Capture the outputs of named modules with forward hooks, stopping the forward pass
    as soon as every requested layer has been seen (the later blocks never run)."""

    def __init__(self, model: nn.Module, layers: Sequence[str], stop_early: bool = True):
        self.model = model
        self.layers = list(layers)
        self.stop_early = stop_early
        self._outputs: dict[str, torch.Tensor] = {}
        self._active = False
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]

    def _hook(self, name: str):
        def hook(module, args, output):
            if not self._active:  # e.g. recomputation under gradient checkpointing, after the forward
                return
            if isinstance(output, (tuple, list)):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise ModelError(f"layer {name!r} returns {type(output).__name__}, not a tensor")
            self._outputs.setdefault(name, output)
            if self.stop_early and len(self._outputs) == len(self.layers):
                raise _StopForward

        return hook

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._outputs = {}
        self._active = True
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            self._active = False
        missing = [n for n in self.layers if n not in self._outputs]
        if missing:
            raise ModelError(f"layer {missing[0]!r} was not called in the forward pass")
        out, self._outputs = self._outputs, {}
        return {n: out[n] for n in self.layers}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def pool_features(x: torch.Tensor, grid: int, num_prefix_tokens: int) -> torch.Tensor:
    """Average-pool patch tokens (B, prefix + H*W, C) or maps (B, C, H, W) to a grid x grid layout.

    Prefix tokens (class, register) are kept as they are, in front of the pooled patches.
    """
    if x.ndim == 4:
        return F.adaptive_avg_pool2d(x, grid)
    if x.ndim != 3:
        raise ModelError(f"--pool needs token (B, L, C) or map (B, C, H, W) outputs, got shape {tuple(x.shape)}")
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ModelError(f"--pool: {patches.shape[1]} patch tokens do not form a square grid")
    maps = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    pooled = F.adaptive_avg_pool2d(maps, grid).flatten(2).transpose(1, 2)
    return torch.cat([prefix, pooled], dim=1)


def layer_features(
    outputs: dict[str, torch.Tensor], layers: Sequence[str], pool: int | None, num_prefix_tokens: int
) -> list[torch.Tensor]:
    """Each layer's output in the form a cache holds it: as captured, or pooled to a `pool` grid.
    extract, predict (images no cache holds) and finetune's forward all read layers through it."""
    return [pool_features(outputs[n], pool, num_prefix_tokens) if pool else outputs[n] for n in layers]


FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_store(name: str, x: torch.Tensor, dtype: str) -> np.ndarray:
    """A layer's features as the cache stores them (`dtype`), on the host; NaN, inf and values
    beyond float16's range are a CacheError naming the layer, not silently stored."""
    peak = float(x.abs().amax()) if x.numel() else 0.0  # one reduction: max propagates NaN
    if not math.isfinite(peak):
        raise CacheError(f"layer {name!r} produced NaN or inf values")
    if dtype == "float16":
        if peak > FLOAT16_MAX:
            raise CacheError(
                f"layer {name!r} has values up to {peak:.3g}, beyond float16's range "
                f"({FLOAT16_MAX:.0f}); use --store-dtype float32"
            )
        return x.half().cpu().numpy()
    return x.float().cpu().numpy()


def layer_shapes(model: nn.Module, layers: Sequence[str], prep: dict, pool: int | None = None) -> dict[str, list[int]]:
    """Per-sample output shape of each layer for the model's input size (one dummy forward)."""
    capture = LayerCapture(model, layers)
    try:
        with torch.inference_mode():
            feats = capture(torch.zeros(1, *prep["input_size"]))
    finally:
        capture.remove()
    prefix = getattr(model, "num_prefix_tokens", 0)
    return {n: list((pool_features(f, pool, prefix) if pool else f).shape[1:]) for n, f in feats.items()}


def all_layer_shapes(model: nn.Module, prep: dict, pattern: str | None = None) -> list[tuple[str, list[int] | None]]:
    """(name, per-sample output shape) of every module, in model order, for `blobenc layers`."""
    names = match_modules(module_names(model), pattern) if pattern else module_names(model)
    shapes: dict[str, list[int]] = {}
    modules = dict(model.named_modules())

    def record(name):
        def hook(module, args, output):
            if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                output = output[0]
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, list(output.shape[1:]))

        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in names]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *prep["input_size"]))
    finally:
        for h in handles:
            h.remove()
    return [(n, shapes.get(n)) for n in names]
