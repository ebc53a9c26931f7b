"""Training samples from a feature cache: (subject, image) pairs with group-space targets."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from blobenc.data.algonauts import AlgonautsDataset, ValidationSplit
from blobenc.errors import CacheError, ConfigError
from blobenc.features.cache import FeatureCache, chunk_ranges
from blobenc.progress import track

logger = logging.getLogger(__name__)


def nsd_keys(ids: np.ndarray) -> list[str]:
    return [f"nsd-{i:05d}" for i in ids.tolist()]


@dataclass
class SampleSet:
    subject: np.ndarray  # (N,) subject index
    feature_row: np.ndarray  # (N,) row in the in-memory feature table
    target: torch.Tensor  # (N, V) group space, 0 where the subject has no vertex
    image_row: np.ndarray  # (N,) row in the subject's fMRI file

    def __len__(self) -> int:
        return len(self.subject)


class CachedFeatures:
    """The cache rows a run needs, read once by whole chunks into RAM (or GPU memory), in float16."""

    def __init__(
        self, cache: FeatureCache, layers: list[str], rows: np.ndarray, device: torch.device, progress: bool = False
    ):
        self.layers, self.views = layers, cache.attrs["views"]
        rows = np.asarray(rows)
        self.tables: list[torch.Tensor] = []
        ranges = chunk_ranges(len(cache.keys), cache.attrs["chunk_images"])
        for layer in layers:
            arr = cache.array(layer)
            out = np.empty((len(rows), *arr.shape[1:]), dtype=arr.dtype)
            for start, stop in track(ranges, f"reading {layer}", progress):
                sel = np.flatnonzero((rows >= start) & (rows < stop))
                if len(sel):
                    out[sel] = arr[start:stop][rows[sel] - start]
            self.tables.append(torch.from_numpy(out).to(device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tables)

    def gather(self, rows: np.ndarray, view: np.ndarray | None = None) -> list[torch.Tensor]:
        """Float32 features of these rows; with views, the given view of each row."""
        idx = torch.as_tensor(rows, device=self.tables[0].device)
        if self.views > 1:
            v = torch.as_tensor(view if view is not None else np.zeros(len(rows), np.int64), device=idx.device)
            return [t[idx, v].float() for t in self.tables]
        return [t[idx].float() for t in self.tables]


class HeadData:
    """Everything fit-head trains and validates on, in memory."""

    def __init__(
        self,
        cache: FeatureCache,
        dataset: AlgonautsDataset,
        split: ValidationSplit,
        layers: list[str] | None,
        device: torch.device,
        progress: bool = False,
    ):
        self.subjects = list(dataset.subjects)
        self.group = dataset.group
        missing = [n for n in (layers or []) if n not in cache.layers]
        if missing:
            raise ConfigError(f"layer {missing[0]!r} is not in the cache; it has {', '.join(cache.layers)}")
        self.layers = list(layers or cache.layers)
        n_vertices = self.group.n_vertices
        self.group_index = {s: dataset.group_index(s) for s in self.subjects}
        masks = np.zeros((len(self.subjects), n_vertices), dtype=bool)
        for i, s in enumerate(self.subjects):
            masks[i, self.group_index[s]] = True
        self.masks = torch.from_numpy(masks).to(device)

        parts: dict[str, list] = {"train": [], "val": []}
        for i, name in enumerate(self.subjects):
            subject = dataset.subjects[name]
            native = subject.fmri_native("train")
            keys = nsd_keys(subject.nsd_ids["train"])
            try:
                cache_rows = cache.rows(keys)
            except CacheError as e:
                raise CacheError(f"{e}: the cache was not extracted from this dataset ({dataset.root})") from None
            for part, rows in zip(("train", "val"), split.rows(subject), strict=True):
                parts[part].append((i, cache_rows[rows], native[rows], rows))
        needed = np.unique(np.concatenate([p[1] for ps in parts.values() for p in ps]))
        local = {int(r): j for j, r in enumerate(needed)}
        self.features = CachedFeatures(cache, self.layers, needed, device, progress)
        logger.info("features of %d images in memory: %.1f MB", len(needed), self.features.nbytes / 1e6)
        self.sets = {part: self._sample_set(ps, local, n_vertices, device) for part, ps in parts.items()}
        if not len(self.sets["train"]) or not len(self.sets["val"]):
            raise ConfigError("the validation split left no training or no validation samples")
        self.layer_shapes = [list(cache.attrs["layer_shapes"][n]) for n in self.layers]

    def _sample_set(self, parts, local, n_vertices, device) -> SampleSet:
        subject = np.concatenate([np.full(len(p[1]), p[0]) for p in parts])
        feature_row = np.asarray([local[int(r)] for p in parts for r in p[1]], dtype=np.int64)
        target = np.zeros((len(subject), n_vertices), dtype=np.float32)
        offset = 0
        for i, _, native, _ in parts:
            target[offset : offset + len(native), self.group_index[self.subjects[i]]] = native
            offset += len(native)
        image_row = np.concatenate([p[3] for p in parts])
        return SampleSet(subject, feature_row, torch.from_numpy(target).to(device), image_row)

    def batch(self, part: str, idx: np.ndarray, view_rng: np.random.Generator | None = None):
        """(features per layer, subject index, target, mask) for samples `idx` of `part`."""
        s = self.sets[part]
        views = None
        if view_rng is not None and self.features.views > 1:
            views = view_rng.integers(0, self.features.views, len(idx))
        feats = self.features.gather(s.feature_row[idx], views)
        subject = torch.as_tensor(s.subject[idx], device=s.target.device)
        return feats, subject, s.target[idx], self.masks[subject]

    def train_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """Training targets in group space and their observed mask, for the group PCA."""
        s = self.sets["train"]
        return s.target.cpu().numpy(), self.masks.cpu()[torch.as_tensor(s.subject)].numpy()
