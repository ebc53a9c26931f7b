"""A fitted model's inputs for any images: cached layer features where a cache holds them, the trunk
(rebuilt from the feature spec and checked against its weights' fingerprint) for the rest, or the
eval-transformed images themselves for a model that contains its trunk (a finetune run).

An image is a file path, or an array (H, W, 3) of uint8 that no cache holds."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from blobenc.errors import CacheError
from blobenc.features.cache import FeatureCache
from blobenc.features.spec import FeatureSpec
from blobenc.profile import timed
from blobenc.runtime import autocast

logger = logging.getLogger(__name__)


def _image_batches(images: Sequence, prep: dict, batch_size: int):
    """Eval-transformed batches (B, 3, H, W) of `images` (paths or uint8 arrays), in order."""
    from blobenc.features.images import ImageViews
    from blobenc.features.trunk import eval_transform

    ds = ImageViews(images, range(len(images)), eval_transform(prep), prep["input_size"])
    for _, x, errs in DataLoader(ds, batch_size=batch_size):
        bad = [e for e in errs if e]
        if bad:
            raise CacheError(bad[0])
        yield x[:, 0]


class FeatureSource:
    """Layer features (one tensor per layer, the cache's dtype) for images: cache rows where the
    cache has their keys, the trunk for the rest, rounded to the cache's dtype as the model was
    trained on it."""

    takes_images = False

    def __init__(self, features: FeatureSpec, layers: Sequence[str], cache: FeatureCache | None, device, amp):
        self.spec, self.layers, self.device, self.amp = features, list(layers), device, amp
        if cache is not None:
            cache.feature_spec().check_serves(features, self.layers, str(cache.path))
        self.cache = cache
        self._trunk = None

    def row_bytes(self) -> tuple[int, int]:
        """Bytes of one image's inputs as float32, and as stored."""
        shapes = [int(np.prod(self.spec.layer_shapes[n])) for n in self.layers]
        return 4 * sum(shapes), np.dtype(self.spec.dtype).itemsize * sum(shapes)

    @timed("trunk")
    def _trunk_features(self, images: Sequence, batch_size: int) -> list[np.ndarray]:
        from blobenc.features.trunk import LayerCapture, layer_features, to_store

        feats = self.spec
        if self._trunk is None:
            self._trunk = feats.create_trunk().to(self.device)
        capture = LayerCapture(self._trunk, self.layers)
        out: list[list[np.ndarray]] = [[] for _ in self.layers]
        try:
            with torch.inference_mode():
                for x in _image_batches(images, feats.preprocessing, batch_size):
                    with autocast(self.device, self.amp):
                        got = capture(x.to(self.device))
                    layers = layer_features(got, self.layers, feats.pool, feats.num_prefix_tokens)
                    for j, (name, f) in enumerate(zip(self.layers, layers, strict=True)):
                        # the model was trained on the cache's dtype: round the same way
                        out[j].append(to_store(name, f, feats.dtype))
        finally:
            capture.remove()
        return [np.concatenate(o) for o in out]

    @timed("features")
    def features(self, keys: Sequence[str | None], images: Sequence, batch_size: int) -> list[torch.Tensor]:
        """Per layer (n, *shape) for images `images` whose cache keys are `keys` (None: not cached)."""
        n = len(images)
        result = None
        in_cache = np.zeros(n, bool)
        if self.cache is not None:
            rows = np.asarray([self.cache.row_of.get(k, -1) if k is not None else -1 for k in keys])
            in_cache = rows >= 0
            if in_cache.any():
                at = np.flatnonzero(in_cache)
                result = []
                for name in self.layers:  # each chunk touched, read once
                    out = None
                    for positions, block in self.cache.read_rows(name, rows[at], view=0):
                        if out is None:
                            out = np.empty((n, *block.shape[1:]), block.dtype)
                        out[at[positions]] = block
                    result.append(out)
        if (~in_cache).any():
            missing = np.flatnonzero(~in_cache)
            logger.info("running the trunk on %d images not in the cache", len(missing))
            computed = self._trunk_features([images[i] for i in missing], batch_size)
            if result is None:
                result = [np.empty((n, *c.shape[1:]), c.dtype) for c in computed]
            for r, c in zip(result, computed, strict=True):
                r[missing] = c
        return [torch.from_numpy(r) for r in result]

    def uncached(self, keys: Sequence[str | None]) -> list[int]:
        """Positions of the images the trunk will read (not in the cache)."""
        if self.cache is None:
            return list(range(len(keys)))
        return [i for i, k in enumerate(keys) if k is None or k not in self.cache.row_of]


class ImageSource:
    """Eval-transformed images (one tensor, (n, 3, H, W)), for a model that contains its trunk."""

    takes_images = True
    cache = None

    def __init__(self, features: FeatureSpec):
        self.prep = features.preprocessing

    def row_bytes(self) -> tuple[int, int]:
        return 4 * int(np.prod(self.prep["input_size"])), 0

    def features(self, keys: Sequence[str | None], images: Sequence, batch_size: int) -> list[torch.Tensor]:
        return [torch.cat(list(_image_batches(images, self.prep, batch_size)))]

    def uncached(self, keys: Sequence[str | None]) -> list[int]:
        return list(range(len(keys)))


def open_cache(path: Path | str | None) -> FeatureCache | None:
    """The cache at `path` when it exists (a run's cache may have moved: the trunk stands in)."""
    return FeatureCache.open(path) if path is not None and Path(path).exists() else None
