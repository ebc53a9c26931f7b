"""Training samples from a feature cache: (subject, image) pairs with group-space targets."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from blobenc.data.base import Dataset, ValidationSplit
from blobenc.distributed import all_agree
from blobenc.errors import CacheError, ConfigError
from blobenc.features.cache import FeatureCache
from blobenc.profile import timed
from blobenc.progress import track
from blobenc.scoring import observed_mask
from blobenc.train.config import FEATURE_DTYPES
from blobenc.train.step import EmbeddedTargets, epoch_batches

logger = logging.getLogger(__name__)


@dataclass
class SampleSet:
    subject: np.ndarray  # (N,) subject index
    key: np.ndarray  # (N,) image key (str)
    path: list[Path]  # (N,) image file
    rows: list[tuple[int, np.ndarray]]  # (subject index, response rows) blocks, in sample order
    feature_row: np.ndarray | None = None  # (N,) row in the feature table (cache-backed data)

    def __len__(self) -> int:
        return len(self.subject)


class SplitTargets:
    """(subject, image) samples of the training images, split by image, with their responses:
    the validation targets in group space for scoring, the training targets through the frozen
    embedding (`embed`) for the loss. What every training data source shares."""

    def __init__(self, dataset: Dataset, split: ValidationSplit, device: torch.device):
        self.dataset = dataset
        self.subjects = list(dataset.subjects)
        self.group = dataset.group
        self.device = device
        self.group_index = {s: dataset.group_index(s) for s in self.subjects}
        parts: dict[str, list] = {"train": [], "val": []}
        for i, name in enumerate(self.subjects):
            for part, rows in zip(("train", "val"), split.rows(dataset.subjects[name]), strict=True):
                parts[part].append((i, rows))
        self.sets = {part: self._sample_set(blocks) for part, blocks in parts.items()}
        n_train, n_val = len(self.sets["train"]), len(self.sets["val"])
        if n_train < 2 or n_val < 2:
            raise ConfigError(
                f"the validation split left {n_train} training and {n_val} validation samples; at least 2 of "
                "each are needed (batch norm, R²): change val_fraction or use more images"
            )
        self.targets: EmbeddedTargets | None = None

    @cached_property
    def val_target(self) -> np.ndarray:
        """(N_val, V) float32 validation responses in group space, read on first use: after a
        command's plan is checked, and after fit-head's group PCA (1.2 GB at the full NSD)."""
        return self.group_targets("val")

    def _sample_set(self, blocks: list[tuple[int, np.ndarray]]) -> SampleSet:
        subjects = [self.dataset.subjects[self.subjects[i]] for i, _ in blocks]
        return SampleSet(
            subject=np.concatenate([np.full(len(rows), i) for i, rows in blocks]),
            key=np.asarray(
                [s.keys["train"][r] for s, (_, rows) in zip(subjects, blocks, strict=True) for r in rows.tolist()],
                dtype=str,
            ),
            path=[s.images["train"][r] for s, (_, rows) in zip(subjects, blocks, strict=True) for r in rows.tolist()],
            rows=blocks,
        )

    def _native_blocks(self, part: str, block: int = 4096) -> Iterator[tuple[int, int, np.ndarray]]:
        """(subject index, first sample of the block, native responses) for blocks of at most
        `block` samples, read by rows from the responses on disk."""
        offset = 0
        for i, rows in self.sets[part].rows:
            subject = self.dataset.subjects[self.subjects[i]]
            for start in range(0, len(rows), block):
                yield i, offset + start, subject.responses("train", rows[start : start + block])
            offset += len(rows)

    @timed("targets")
    def group_targets(self, part: str, samples: np.ndarray | None = None) -> np.ndarray:
        """(N, V) float32 responses of `part` in group space, 0 where the sample's subject has no vertex;
        with `samples` (sorted indices into the part), of those samples only, read by rows."""
        if samples is None:
            target = np.zeros((len(self.sets[part]), self.group.n_vertices), dtype=np.float32)
            for i, offset, native in self._native_blocks(part):
                target[offset : offset + len(native), self.group_index[self.subjects[i]]] = native
            return target
        target = np.zeros((len(samples), self.group.n_vertices), dtype=np.float32)
        offset = 0
        for i, rows in self.sets[part].rows:
            lo, hi = np.searchsorted(samples, [offset, offset + len(rows)])
            if hi > lo:
                native = self.dataset.subjects[self.subjects[i]].responses("train", rows[samples[lo:hi] - offset])
                target[lo:hi, self.group_index[self.subjects[i]]] = native
            offset += len(rows)
        return target

    def observed(self, part: str, samples: np.ndarray | None = None) -> np.ndarray:
        """(N, V) True where the sample's subject has the vertex (of `samples` only, when given)."""
        subject = self.sets[part].subject if samples is None else self.sets[part].subject[samples]
        return observed_mask(subject, self.subjects, self.group_index, self.group.n_vertices)

    @timed("embed targets")
    @torch.no_grad()
    def embed(self, weight: torch.Tensor, bias: torch.Tensor, block: int = 4096) -> None:
        """Training targets through the frozen embedding (group prediction = weight @ z + bias):
        (r, q) per sample and G_s per subject (see EmbeddedTargets), straight from the native
        responses, so group-space training targets are never held."""
        w = weight.detach().float().to(self.device)
        c = bias.detach().float().to(self.device)
        full = w.T @ w
        gram, counts = [], []
        for name in self.subjects:
            idx = torch.as_tensor(self.group_index[name], device=self.device)
            lacks = torch.ones(len(c), dtype=torch.bool, device=self.device)
            lacks[idx] = False
            gram.append(full - w[lacks].T @ w[lacks])  # the few vertices a subject lacks, not all it has
            counts.append(len(idx))
        n = len(self.sets["train"])
        r = torch.empty(n, w.shape[1], device=self.device)
        q = torch.empty(n, device=self.device)
        for i, offset, native in self._native_blocks("train", block):
            idx = torch.as_tensor(self.group_index[self.subjects[i]], device=self.device)
            y = torch.as_tensor(native, device=self.device) - c[idx]
            r[offset : offset + len(y)] = y @ w[idx]
            q[offset : offset + len(y)] = (y * y).sum(1)
        self.targets = EmbeddedTargets(r, q, torch.stack(gram), torch.tensor(counts, device=self.device))

    def training_batch(self, idx: np.ndarray, feats: list[torch.Tensor]):
        """(features, subject index, r, q) for training samples `idx`."""
        if self.targets is None:
            raise RuntimeError("embed() the training targets before drawing training batches")
        i = torch.as_tensor(idx, device=self.device)
        return feats, self._subjects("train", idx), self.targets.r[i], self.targets.q[i]

    def _subjects(self, part: str, idx: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(self.sets[part].subject[idx], device=self.device)


def scale_axes(shape: tuple[int, ...], views: int) -> tuple[int, ...]:
    """The axes of a layer's (images[, views], *row) array an int8 scale spans: a row's positions.
    Tokens (T, C) and CNN maps (C, H, W) keep their channel axis (the layouts trunk.pool_features
    takes); a vector (C,) has one scale per row."""
    lead = 2 if views > 1 else 1  # the image axis, then the view axis if any
    ndim = len(shape) - lead
    if ndim not in (1, 2, 3):
        raise ConfigError(f"feature_dtype=int8: rows of {ndim} dimensions; expected tokens, maps or vectors")
    channel = {1: None, 2: 1, 3: 0}[ndim]
    return tuple(lead + a for a in range(ndim) if a != channel)


def feature_row_bytes(cache: FeatureCache, layers: list[str], dtype: str = "cache") -> int:
    """Bytes one image's features of `layers` take in memory as `dtype` holds them."""
    total = 0
    for name in layers:
        arr = cache.array(name)
        if dtype == "int8":  # a byte a value, 4 a scale
            spans = scale_axes(arr.shape, cache.attrs["views"])
            scales = [n for a, n in enumerate(arr.shape[1:], 1) if a not in spans]
            total += int(np.prod(arr.shape[1:])) + 4 * int(np.prod(scales))
        else:
            total += int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
    return total


class CachedFeatures:
    """The cache rows a run needs, read once by chunks straight into RAM (or GPU memory), as the
    cache stores them (float16) or, with `dtype="int8"`, quantized: each image's values of a
    channel scaled by their largest magnitude over the positions (symmetric, 127 levels), which
    halves the memory (the full NSD's EVA02-base features: 173 -> 87 GB, within one H200)."""

    @timed("read features")
    def __init__(
        self,
        cache: FeatureCache,
        layers: list[str],
        rows: np.ndarray,
        device: torch.device,
        progress: bool = False,
        dtype: str = "cache",
    ):
        if dtype not in FEATURE_DTYPES:
            raise ConfigError(f"feature_dtype={dtype!r}: expected one of {', '.join(FEATURE_DTYPES)}")
        self.layers, self.views = layers, cache.attrs["views"]
        rows = np.asarray(rows)
        self.tables: list[torch.Tensor] = []
        self.scales: list[torch.Tensor | None] = []
        for layer in layers:
            arr = cache.array(layer)
            shape = (len(rows), *arr.shape[1:])
            if dtype == "int8":
                reduce = scale_axes(arr.shape, self.views)
                table = torch.empty(shape, dtype=torch.int8, device=device)
                scale_shape = [n if a not in reduce else 1 for a, n in enumerate(shape)]
                scale = torch.empty(scale_shape, dtype=torch.float32, device=device)
            else:
                table = torch.empty(shape, dtype=getattr(torch, str(arr.dtype)), device=device)
                scale = None
            n_chunks = len(np.unique(rows // cache.attrs["chunk_images"]))
            for positions, block in track(cache.read_rows(layer, rows), f"reading {layer}", progress, n_chunks):
                at = torch.as_tensor(positions, device=device)
                x = torch.from_numpy(block).to(device)
                if scale is None:
                    table[at] = x
                    continue
                x = x.float()
                s = x.abs().amax(dim=reduce, keepdim=True).clamp_min(1e-30) / 127
                table[at] = x.div_(s).round_().to(torch.int8)  # in place: one float32 copy of the chunk
                scale[at] = s
            self.tables.append(table)
            self.scales.append(scale)

    @property
    def nbytes(self) -> int:
        tensors = [t for t in self.tables + self.scales if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def gather(self, rows: np.ndarray, view: np.ndarray | None = None) -> list[torch.Tensor]:
        """Float32 features of these rows; with views, the given view of each row."""
        idx = torch.as_tensor(rows, device=self.tables[0].device)
        if self.views > 1:
            v = torch.as_tensor(view if view is not None else np.zeros(len(rows), np.int64), device=idx.device)
            idx = (idx, v)
        out = []
        for table, scale in zip(self.tables, self.scales, strict=True):
            x = table[idx].float()
            out.append(x if scale is None else x.mul_(scale[idx]))
        return out


class ChunkStream:
    """Out-of-core features: whole cache chunks read in a shuffled order by a prefetch thread,
    their samples mixed in a shuffle buffer. Memory: the buffer plus `prefetch` chunks."""

    def __init__(self, cache: FeatureCache, layers: list[str], max_memory: int, batch_size: int, prefetch: int = 2):
        self.arrays = [cache.array(n) for n in layers]
        self.views = cache.attrs["views"]
        self.chunk_images = cache.attrs["chunk_images"]
        self.n_rows = len(cache.keys)
        row_bytes = feature_row_bytes(cache, layers)
        self.prefetch = prefetch
        floor = (prefetch + 1) * self.chunk_images * row_bytes  # chunks being read, queued and consumed
        if max_memory < floor:
            logger.warning(
                "--max-memory %.0f MB is below the streaming floor of %d chunks (%.0f MB): using the floor",
                max_memory / 1e6,
                prefetch + 1,
                floor / 1e6,
            )
        self.buffer_size = max(2 * batch_size, (max_memory - floor) // max(row_bytes, 1))

    def _chunks(self, order: np.ndarray) -> Iterator[tuple[int, list[np.ndarray]]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def read():
            try:
                for c in order.tolist():
                    if stop.is_set():
                        return
                    start = c * self.chunk_images
                    q.put((c, [a[start : min(start + self.chunk_images, self.n_rows)] for a in self.arrays]))
                q.put(None)
            except BaseException as e:  # handed to the consumer, raised there
                q.put(e)

        thread = threading.Thread(target=read, daemon=True, name="blobenc-prefetch")
        thread.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a reader waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.05)

    def batches(
        self,
        cache_rows: np.ndarray,
        batch_size: int,
        rng: np.random.Generator | None,
        view_rng: np.random.Generator | None,
        min_last: int,
    ) -> Iterator[tuple[np.ndarray, list]]:
        """(sample indices, features per layer) batches over the samples whose cache rows are given.

        With `rng`, chunk order and buffer draws are shuffled; without, samples come in cache order.
        """
        chunk_of = cache_rows // self.chunk_images
        chunks = np.unique(chunk_of)
        order = rng.permutation(chunks) if rng is not None else chunks
        by_chunk = {int(c): np.flatnonzero(chunk_of == c) for c in chunks}
        buf_idx: list[int] = []
        buf_feats: list[list[np.ndarray]] = [[] for _ in self.arrays]
        limit = self.buffer_size if rng is not None else batch_size

        def emit(n):
            pick = rng.choice(len(buf_idx), n, replace=False) if rng is not None else np.arange(n)
            keep = np.setdiff1d(np.arange(len(buf_idx)), pick)
            idx = np.asarray(buf_idx)[pick]
            feats = [np.stack([layer[i] for i in pick]) for layer in buf_feats]
            buf_idx[:] = [buf_idx[i] for i in keep]
            for layer in buf_feats:
                layer[:] = [layer[i] for i in keep]
            if self.views > 1:
                v = view_rng.integers(0, self.views, len(idx)) if view_rng is not None else np.zeros(len(idx), int)
                feats = [f[np.arange(len(idx)), v] for f in feats]
            return idx, feats

        for c, blocks in self._chunks(order):
            samples = by_chunk[c]
            local = cache_rows[samples] - c * self.chunk_images
            buf_idx.extend(samples.tolist())
            for layer, block in zip(buf_feats, blocks, strict=True):
                layer.extend(block[local])
            while len(buf_idx) >= limit:
                yield emit(batch_size)
        while len(buf_idx) >= min_last:
            yield emit(min(batch_size, len(buf_idx)))


class HeadData(SplitTargets):
    """Everything fit-head trains and validates on: the targets from the start, the features once
    `read_features` is called (fit-head calls it after the group PCA, whose targets would otherwise
    share the memory with them): in memory when they fit `max_memory` (bytes; None = always), else
    streamed by chunks from the cache."""

    def __init__(
        self,
        cache: FeatureCache,
        dataset: Dataset,
        split: ValidationSplit,
        layers: list[str] | None,
        device: torch.device,
        progress: bool = False,
    ):
        super().__init__(dataset, split, device)
        missing = [n for n in (layers or []) if n not in cache.layers]
        if missing:
            raise ConfigError(f"layer {missing[0]!r} is not in the cache; it has {', '.join(cache.layers)}")
        self.cache, self.progress = cache, progress
        self.layers = list(layers or cache.layers)
        try:
            rows = {part: cache.rows(s.key.tolist()) for part, s in self.sets.items()}
        except CacheError as e:
            raise CacheError(f"{e}: the cache was not extracted from this dataset ({dataset.root})") from None
        needed = np.unique(np.concatenate(list(rows.values())))
        self.cache_rows = needed  # cache row of each feature row
        for part, s in self.sets.items():
            s.feature_row = np.searchsorted(needed, rows[part])
        self.features, self.stream = None, None
        self.layer_shapes = [list(cache.attrs["layer_shapes"][n]) for n in self.layers]

    def read_features(self, max_memory: int | None = None, batch_size: int = 512, dtype: str = "cache") -> None:
        """Features of every sample into memory (the device's: a GPU's when training there) as
        `dtype` holds them (CachedFeatures) when they fit `max_memory`, else a chunk stream whose
        shuffle buffer holds at least 2 batches of `batch_size`."""
        cache, needed = self.cache, self.cache_rows
        row_bytes = feature_row_bytes(cache, self.layers, dtype)
        # under DDP every rank reads its batches the same way, or their samples would not partition the batch
        if all_agree(max_memory is None or len(needed) * row_bytes <= max_memory):
            self.features = CachedFeatures(cache, self.layers, needed, self.device, self.progress, dtype)
            logger.info(
                "features of %d images in %s memory (%s): %.1f MB",
                len(needed),
                "GPU" if self.device.type == "cuda" else "host",
                dtype,
                self.features.nbytes / 1e6,
            )
        else:
            self.stream = ChunkStream(cache, self.layers, max_memory, batch_size)
            logger.info(
                "features of %d images (%.1f MB as %s) exceed the feature memory: streaming chunks "
                "(as the cache stores them), buffer of %d",
                len(needed),
                len(needed) * row_bytes / 1e6,
                dtype,
                self.stream.buffer_size,
            )

    def features_of(self, part: str, idx: np.ndarray, view_rng: np.random.Generator | None = None):
        """Features per layer of samples `idx` of `part` (in memory); a random view each with `view_rng`."""
        views = None
        if view_rng is not None and self.features.views > 1:
            views = view_rng.integers(0, self.features.views, len(idx))
        return self.features.gather(self.sets[part].feature_row[idx], views)

    def train_batches(
        self, batch_size: int, seed: int, epoch: int, min_last: int = 2, start: int = 0
    ) -> Iterator[tuple]:
        """One shuffled epoch of (features, subject, r, q) batches; the order depends on (seed, epoch).
        `start` skips the epoch's first batches (a resume mid-epoch): the rest are as they would be."""
        view_rng = np.random.default_rng([seed, epoch, 1])
        if self.stream is None:
            for b, idx in enumerate(epoch_batches(len(self.sets["train"]), batch_size, seed, epoch, min_last)):
                if b >= start:
                    yield self.training_batch(idx, self.features_of("train", idx, view_rng))
                elif self.features.views > 1:
                    view_rng.integers(0, self.features.views, len(idx))  # the draws the skipped batch made
            return
        rows = self.cache_rows[self.sets["train"].feature_row]
        rng = np.random.default_rng([seed, epoch])
        for b, (idx, feats) in enumerate(self.stream.batches(rows, batch_size, rng, view_rng, min_last)):
            if b >= start:  # streamed: the skipped chunks are read again to replay the shuffle
                yield self.training_batch(idx, [torch.from_numpy(f).to(self.device).float() for f in feats])

    def val_batches(self, batch_size: int) -> Iterator[tuple]:
        """(sample indices, features, subject) over the validation samples, view 0."""
        n = len(self.sets["val"])
        if self.stream is None:
            for idx in np.array_split(np.arange(n), max(1, -(-n // batch_size))):
                yield idx, self.features_of("val", idx), self._subjects("val", idx)
            return
        rows = self.cache_rows[self.sets["val"].feature_row]
        for idx, feats in self.stream.batches(rows, batch_size, None, None, 1):
            yield idx, [torch.from_numpy(f).to(self.device).float() for f in feats], self._subjects("val", idx)
