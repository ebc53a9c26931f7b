"""Fitted models as one kind of object. `load_run(path)` rebuilds any run folder (fit-head, a sweep's
best trial, an ensemble, finetune, fit-ridge, an imported reference) as an `Encoder`: what
`predict`, the combinations and the Python API use without asking which kind it is."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from blobenc.data.base import GroupSpace, Subject
from blobenc.errors import ConfigError
from blobenc.features.cache import FeatureCache
from blobenc.features.spec import FeatureSpec
from blobenc.files import read_json
from blobenc.heads import HeadEnsemble, create_head
from blobenc.profile import timed
from blobenc.runtime import autocast, resolve_device, resolve_precision
from blobenc.train.checkpoint import ModelSpec, load_state, load_weights, resolve_run
from blobenc.train.runfolder import RunFolder

logger = logging.getLogger(__name__)


class Encoder:
    """A fitted image-computable encoding model.

    It reads `layers` of the features `features` describes (the cache's feature spec: trunk,
    weights fingerprint, preprocessing, pooling, dtype), or images when `takes_images`, and
    predicts `subjects`. `predict_features(inputs, subject)` gives (n, subject's targets) in the
    subject's own target order; `predict(subject, images=...)` reads the inputs itself.
    """

    def __init__(self, path: Path, spec: ModelSpec):
        self.path, self.spec = Path(path), spec
        self.subjects: list[str] = list(spec.subjects)
        self.layers: list[str] = list(spec.layers)
        self.features: FeatureSpec = spec.features
        # the space a group model predicts in; None for a reference imported without --data
        self.group: GroupSpace | None = GroupSpace.from_dict(spec.group) if spec.group else None
        self.device, self.amp = torch.device("cpu"), None
        self.source = None  # set by open_inputs

    takes_images = False  # a finetuned trunk + head reads images, not cached features

    @property
    def cache_path(self) -> Path | None:
        """The cache the model was fitted on (it may have moved since)."""
        return Path(self.spec.cache) if self.spec.cache else None

    def to(self, device: str | torch.device = "auto", precision: str = "auto") -> Encoder:
        self.device = resolve_device(str(device))
        self.amp = resolve_precision(precision, self.device)
        return self

    def weight_bytes(self) -> int:
        """Bytes of the weights held while predicting."""
        return 0

    def open_inputs(self, cache: Path | str | FeatureCache | bool | None = None):
        """Where inputs come from: `cache` (default: the run's own, if it still exists; False: none,
        the trunk computes every image's features), else the trunk. Returns the source."""
        from blobenc.features.source import FeatureSource, ImageSource, open_cache

        if self.takes_images:
            self.source = ImageSource(self.features)
        else:
            if cache is False:
                opened = None
            elif isinstance(cache, FeatureCache):
                opened = cache
            else:
                opened = open_cache(cache if cache is not None else self.cache_path)
            self.source = FeatureSource(self.features, self.layers, opened, self.device, self.amp)
        return self.source

    def inputs(self, keys: Sequence[str | None], images: Sequence, batch_size: int = 64) -> list[torch.Tensor]:
        """The model's inputs for images (paths or arrays) whose cache keys are `keys`."""
        if self.source is None:
            self.open_inputs()
        return self.source.features(keys, images, batch_size)

    def predict_features(self, inputs: list[torch.Tensor], subject: Subject, batch_size: int = 64) -> np.ndarray:
        raise NotImplementedError

    def predict(
        self,
        subject: Subject,
        images: Path | str | Sequence | np.ndarray | None = None,
        split: str = "test",
        batch_size: int = 64,
    ) -> np.ndarray:
        """(n, subject's targets) float32 predictions of `subject` (a Subject of the dataset).

        `images`: a folder of images (sorted as `blobenc predict --images` lists them), a list of
        image files, or an array (N, H, W, 3) of uint8 images; None: the subject's `split` images,
        read from the cache where it holds them."""
        if subject.name not in self.subjects:
            raise ConfigError(f"subject {subject.name}: the run was trained on {', '.join(self.subjects)}")
        if images is None:
            keys, paths = list(subject.keys[split]), list(subject.images[split])
        elif isinstance(images, str | Path):
            from blobenc.features.images import list_images

            keys, paths = list_images(Path(images))
            keys = [None] * len(paths)  # a folder's relative paths are not cache keys
        else:
            paths = list(images)
            keys = [None] * len(paths)
        return self.predict_features(self.inputs(keys, paths, batch_size), subject, batch_size)


class HeadEncoder(Encoder):
    """A torch model over a group space: a fit-head head, an ensemble of heads, a finetuned trunk +
    head; its group-space predictions are taken at the subject's targets."""

    def __init__(self, path: Path, spec: ModelSpec, module: torch.nn.Module):
        super().__init__(path, spec)
        self.module = module.eval()
        self.takes_images = spec.finetuned

    def to(self, device: str | torch.device = "auto", precision: str = "auto") -> HeadEncoder:
        super().to(device, precision)
        self.module.to(self.device)
        return self

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.module.parameters())

    @timed("predict")
    @torch.no_grad()
    def predict_features(self, inputs: list[torch.Tensor], subject: Subject, batch_size: int = 64) -> np.ndarray:
        if self.group is None:
            raise ConfigError(f"{self.path}: the run has no group space; give the dataset it predicts in (--data)")
        index = torch.as_tensor(self.group.positions(subject.targets, str(subject.path)))
        idx = torch.full((batch_size,), self.subjects.index(subject.name), device=self.device)
        preds = []
        for start in range(0, len(inputs[0]), batch_size):
            chunk = [f[start : start + batch_size].to(self.device).float() for f in inputs]
            with autocast(self.device, self.amp):
                preds.append(self.module(chunk, idx[: len(chunk[0])]).float().cpu()[:, index])
        return torch.cat(preds).numpy()


class RidgeEncoder(Encoder):
    """A fit-ridge run: one fit per subject in its own target order, loaded on first use; a dual
    (kernel) fit reads its training images' features from the cache."""

    def __init__(self, path: Path, spec: ModelSpec):
        super().__init__(path, spec)
        self.mode = spec.ridge["features"]
        self.prefix = int(self.features.num_prefix_tokens or 0)
        self._loaded: tuple[str, tuple] | None = None  # the last subject's fit: predict asks by blocks of rows

    @timed("predict")
    @torch.no_grad()
    def predict_features(self, inputs: list[torch.Tensor], subject: Subject, batch_size: int = 64) -> np.ndarray:
        from blobenc.ridge import reduce_layer
        from blobenc.train.ridge import LayerFeatures, load_fit, predict_features

        cache = self.source.cache if self.source is not None else None
        if self._loaded is None or self._loaded[0] != subject.name:
            fit, rows = load_fit(self.path / "weights" / f"{subject.name}.safetensors", cache, self.device)
            train = LayerFeatures(cache, self.layers, self.mode, rows, max_memory=0) if rows is not None else None
            self._loaded = subject.name, (fit, train)
        fit, train = self._loaded[1]
        reduced = [reduce_layer(x, self.mode, self.prefix, n) for x, n in zip(inputs, self.layers, strict=True)]
        return predict_features(fit, reduced, train, self.device).float().cpu().numpy()


def load_run(run: Path | str, which: str = "best") -> Encoder:
    """Rebuild a fitted model from its run folder alone: model.json + <which>.safetensors (the frozen
    embedding from the run's PCA file when the checkpoint does not hold it). A sweep gives its best
    trial; a run with `ensemble.json` (fit-head --ensemble) all its members, averaged."""
    if (Path(run) / "run.json").is_file() and RunFolder(run).state() == "unfinished":
        logger.warning("%s: the run has not finished (or was interrupted); using its %s weights so far", run, which)
    if (Path(run) / "ensemble.json").is_file():
        return _load_ensemble(Path(run), which)
    tdir = resolve_run(run)
    spec = ModelSpec.read(tdir / "model.json")
    if spec.kind == "ridge":
        return RidgeEncoder(tdir, spec)
    if spec.finetuned:  # trunk + head in one state dict
        from blobenc.train.finetune import build_encoder  # the trunk's timm: only for these runs

        model = build_encoder(spec)
    else:
        model = create_head(spec.head, **spec.kwargs)
    load_state(model, load_weights(tdir / f"{which}.safetensors"), spec.pca_path(tdir))
    return HeadEncoder(tdir, spec, model)


def _load_ensemble(run: Path, which: str) -> HeadEncoder:
    """The members ensemble.json names, as one model reading the union of their layers."""
    names = read_json(run / "ensemble.json")["members"]
    members = [load_run(run / d, which) for d in names]
    layers = list(dict.fromkeys(n for m in members for n in m.layers))
    model = HeadEnsemble([m.module for m in members], [[layers.index(n) for n in m.layers] for m in members])
    return HeadEncoder(run, replace(members[0].spec, layers=layers, ensemble=names), model)
