"""The feature cache: one Zarr v3 group, one array per layer, chunked along images (docs/formats.md).

Completion is tracked per chunk in the `_chunk_done` array (one tiny chunk per
flag, so concurrent shards never write the same file); a flag is set only after
that chunk's data for every layer is on disk. A cache is complete when every
flag is set: a half-written store is never taken for a complete one.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from blobenc.errors import CacheError
from blobenc.features.spec import FeatureSpec
from blobenc.profile import phase

FORMAT = "blobenc.features"
VERSION = 1
DONE = "_chunk_done"
# Rows of a chunk read one by one while they are fewer than chunk_images / SPARSE_FRACTION.
SPARSE_FRACTION = 4
# Settings that must match for a resume; everything else in the attributes is derived.
IDENTITY_KEYS = (
    "model",
    "weights_fingerprint",
    "preprocessing",
    "layers",
    "dtype",
    "pool",
    "views",
    "crop_scale",
    "chunk_images",
    "images",
)


def _describe(key: str, value) -> str:
    if key == "images":
        return f"{len(value)} images starting {value[:2]}"
    return repr(value)


def is_cache(path: Path) -> bool:
    try:
        return zarr.open_group(path, mode="r").attrs.get("format") == FORMAT
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, OSError):
        return False


def create_or_open(
    path: Path, attrs: dict, arrays: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], *, overwrite: bool = False
) -> zarr.Group:
    """Create the store (atomically, so concurrent shards agree) or open it for a resume.

    `arrays` maps a layer name to (shape, chunks). An existing store made with other
    settings is refused, naming what differs; `overwrite` deletes a blobenc cache first.
    """
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        if not is_cache(path):
            raise CacheError(f"{path}: exists and is not a blobenc feature cache; refusing to write there")
        if overwrite:
            shutil.rmtree(path)
        else:
            return _open_for_resume(path, attrs)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(tmp, mode="w-", zarr_format=3)
    for name, (shape, chunks) in arrays.items():
        group.create_array(
            name, shape=shape, chunks=chunks, dtype=attrs["dtype"], compressors=None, fill_value=0, dimension_names=None
        )
    group.create_array(DONE, shape=(attrs["n_chunks"],), chunks=(1,), dtype="uint8", fill_value=0, compressors=None)
    group.attrs.update(attrs)  # written last: a group with our format tag is fully laid out
    try:
        if path.is_dir():
            path.rmdir()  # an empty folder the user made for us
        tmp.rename(path)
    except OSError:  # another shard created it first: use theirs if it matches
        shutil.rmtree(tmp, ignore_errors=True)
        return _open_for_resume(path, attrs)
    return zarr.open_group(path, mode="r+")


def _open_for_resume(path: Path, attrs: dict) -> zarr.Group:
    group = zarr.open_group(path, mode="r+")
    stored = dict(group.attrs)
    if stored.get("version") != VERSION:
        raise CacheError(f"{path}: cache format version {stored.get('version')}, this blobenc writes {VERSION}")
    for key in IDENTITY_KEYS:
        if stored.get(key) != attrs[key]:
            raise CacheError(
                f"{path}: was made with a different {key} (stored {_describe(key, stored.get(key))}, "
                f"requested {_describe(key, attrs[key])}); use --overwrite to start over or --out elsewhere"
            )
    return group


def chunk_ranges(n_images: int, chunk_images: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_images, n_images)) for s in range(0, n_images, chunk_images)]


def shard_chunks(n_chunks: int, shard: int, n_shards: int) -> range:
    """The contiguous range of chunks shard `shard` of `n_shards` fills."""
    return range(shard * n_chunks // n_shards, (shard + 1) * n_chunks // n_shards)


@dataclass
class FeatureCache:
    """Read access to a complete (or, with `allow_incomplete`, partial) feature cache."""

    path: Path
    group: zarr.Group

    @classmethod
    def open(cls, path: Path | str, *, allow_incomplete: bool = False) -> FeatureCache:
        path = Path(path)
        if not path.exists():
            raise CacheError(f"{path}: feature cache not found")
        try:
            group = zarr.open_group(path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as e:
            raise CacheError(f"{path}: not a Zarr group ({e})") from None
        if group.attrs.get("format") != FORMAT:
            raise CacheError(f"{path}: not a blobenc feature cache (no format={FORMAT!r} attribute)")
        if group.attrs.get("version") != VERSION:
            raise CacheError(f"{path}: cache format version {group.attrs.get('version')}, expected {VERSION}")
        cache = cls(path, group)
        if not allow_incomplete and not cache.complete:
            done, total = cache.chunks_done
            raise CacheError(f"{path}: incomplete ({done}/{total} chunks); rerun the same extract command to finish")
        return cache

    @cached_property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def layers(self) -> list[str]:
        return list(self.attrs["layers"])

    @property
    def keys(self) -> list[str]:
        return list(self.attrs["images"])

    @cached_property
    def row_of(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def rows(self, keys: list[str]) -> np.ndarray:
        """Row index of each image key; a key the cache lacks is an error naming it."""
        try:
            return np.asarray([self.row_of[k] for k in keys], dtype=np.int64)
        except KeyError as e:
            raise CacheError(f"{self.path}: image {e.args[0]} is not in the cache") from None

    def feature_spec(self) -> FeatureSpec:
        """What a model trained on this cache needs to rebuild its inputs: trunk, weights, preprocessing."""
        return FeatureSpec.from_dict(dict(self.attrs), str(self.path))

    def array(self, layer: str) -> zarr.Array:
        return self.group[layer]

    def read_rows(
        self, layer: str, rows: np.ndarray, view: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, block) pairs covering `rows` of a layer, one per cache chunk touched: block[j]
        is row rows[positions[j]]. `view` picks one view of a multi-view cache.

        zarr reads whole chunks (its per-index selection costs ~15 ms an index), which is right
        when most of a chunk's rows are wanted (training). A few rows of a chunk (test images,
        scattered among the training images in key order) are read on their own: chunks are
        stored uncompressed, so a row is one contiguous byte range of the chunk's file. Predicting
        8 subjects' 40 test images at 1,000 training images per subject read 1.6 GB for 121 MB."""
        rows = np.asarray(rows, dtype=np.int64)
        arr = self.array(layer)
        chunk = self.attrs["chunk_images"]
        of_chunk = rows // chunk
        for c in np.unique(of_chunk).tolist():
            positions = np.flatnonzero(of_chunk == c)
            local = rows[positions] - c * chunk
            block = None
            if len(positions) * SPARSE_FRACTION < chunk:
                with phase("read by byte range"):  # --profile shows which route the reads took
                    block = self._read_sparse(arr, c, local)
            if block is None:
                with phase("read whole chunk"):
                    block = arr[c * chunk : min((c + 1) * chunk, arr.shape[0])][local]
            if view is not None and self.attrs["views"] > 1:
                block = block[:, view]
            yield positions, block

    def _read_sparse(self, arr: zarr.Array, c: int, local: np.ndarray) -> np.ndarray | None:
        """Rows `local` of chunk `c` read by byte range from its file; None where that layout does
        not hold (compressed or transposed chunks, a chunk not written)."""
        meta = arr.metadata
        plain = len(meta.codecs) == 1 and isinstance(meta.codecs[0], BytesCodec)
        if not plain or (arr.dtype.itemsize > 1 and meta.codecs[0].endian.value != sys.byteorder):
            return None
        if tuple(meta.chunk_grid.chunk_shape[1:]) != arr.shape[1:]:
            return None
        file = self.path / arr.path / meta.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
        out = np.empty((len(local), *arr.shape[1:]), dtype=arr.dtype)
        row_bytes = out[0].nbytes if len(out) else 0
        try:
            fd = os.open(file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            for j, r in enumerate(local.tolist()):
                if os.preadv(fd, [memoryview(out[j]).cast("B")], r * row_bytes) != row_bytes:
                    return None  # a short file: let zarr read it (and complain)
        finally:
            os.close(fd)
        return out

    def done_flags(self) -> np.ndarray:
        return self.group[DONE][:].astype(bool)

    @property
    def chunks_done(self) -> tuple[int, int]:
        flags = self.done_flags()
        return int(flags.sum()), len(flags)

    @property
    def complete(self) -> bool:
        return bool(self.done_flags().all())

    def info(self) -> dict:
        """What `blobenc info` shows: settings, shapes, progress, bytes on disk, compression ratio."""
        a = self.attrs
        done, total = self.chunks_done
        on_disk = {layer: _folder_bytes(self.path / layer) for layer in self.layers}
        itemsize = np.dtype(a["dtype"]).itemsize
        row_bytes = {layer: int(np.prod(self.array(layer).shape[1:])) * itemsize for layer in self.layers}
        # zarr stores a partial last chunk at full size, so the codec's ratio is over whole chunks
        logical = sum(row_bytes.values()) * done * a["chunk_images"]
        return {
            "path": str(self.path),
            "model": a["model"],
            "trunk": a["trunk"],
            "weights_fingerprint": a["weights_fingerprint"],
            "preprocessing": a["preprocessing"],
            "layers": {
                layer: {"shape": list(self.array(layer).shape[1:]), "bytes_on_disk": on_disk[layer]}
                for layer in self.layers
            },
            "dtype": a["dtype"],
            "pool": a["pool"],
            "views": a["views"],
            "images": len(a["images"]),
            "chunk_images": a["chunk_images"],
            "chunks_done": done,
            "chunks_total": total,
            "complete": done == total,
            "bytes_per_image": sum(row_bytes.values()),
            "bytes_on_disk": _folder_bytes(self.path),
            "compression_ratio": logical / max(1, sum(on_disk.values())),
        }


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
