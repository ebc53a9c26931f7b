"""The feature cache: one Zarr v3 group, one array per layer, chunked along images (docs/formats.md).

Completion is tracked per chunk in the `_chunk_done` array (one tiny chunk per
flag, so concurrent shards never write the same file); a flag is set only after
that chunk's data for every layer is on disk. A cache is complete when every
flag is set: a half-written store is never taken for a complete one.

Health: every chunk file ends with its CRC32C (zarr's `crc32c` codec), checked when a whole
chunk is read; a chunk read by byte range is checked for its size. A missing layer array, a
missing or short chunk file or a wrong checksum is a CacheError naming the layer and chunk;
`verify` reads everything, and `extract` recomputes exactly the chunks it finds damaged.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

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


def identity_difference(path: Path, attrs: dict) -> str | None:
    """What differs between the settings the cache at `path` was made with and `attrs` (the
    format version, then IDENTITY_KEYS), as one phrase; None when it was made with them."""
    stored = dict(zarr.open_group(path, mode="r").attrs)
    if stored.get("version") != VERSION:
        return f"cache format version {stored.get('version')}, this blobenc writes {VERSION}"
    for key in IDENTITY_KEYS:
        if stored.get(key) != attrs[key]:
            return (
                f"was made with a different {key} (stored {_describe(key, stored.get(key))}, "
                f"requested {_describe(key, attrs[key])})"
            )
    return None


def create_or_open(path: Path, attrs: dict, arrays: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> zarr.Group:
    """Create the store (atomically, so concurrent shards agree) or open it for a resume.

    `arrays` maps a layer name to (shape, chunks). An existing store made with other
    settings is refused, naming what differs.
    """
    path = Path(path)
    if path.is_file() or (path.is_dir() and any(path.iterdir())):
        if not is_cache(path):
            raise CacheError(f"{path}: exists and is not a blobenc feature cache; refusing to write there")
        return _open_for_resume(path, attrs)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(tmp, mode="w-", zarr_format=3)
    for name, (shape, chunks) in arrays.items():
        create_layer_array(group, name, shape, chunks, attrs["dtype"])
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


def create_layer_array(group: zarr.Group, name: str, shape, chunks, dtype: str) -> zarr.Array:
    """A layer's array: uncompressed (activations barely compress, and a row stays one byte range
    of its chunk's file) with a CRC32C after each chunk; every chunk written, even all-zero ones,
    so a missing file always means damage."""
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        compressors=[Crc32cCodec()],
        fill_value=0,
        dimension_names=None,
        config={"write_empty_chunks": True},
        overwrite=True,
    )


def _open_for_resume(path: Path, attrs: dict) -> zarr.Group:
    difference = identity_difference(path, attrs)
    if difference is not None:
        raise CacheError(f"{path}: {difference}; use --overwrite to start over or --out elsewhere")
    return zarr.open_group(path, mode="r+")


def repair(path: Path, group: zarr.Group, arrays: dict, dtype: str, chunks: Sequence[int]) -> dict[str, list[int]]:
    """Before a resume fills what is left: recreate missing layer arrays and clear the completion
    flag of every damaged chunk among `chunks` (FeatureCache.verify), so they are computed again.
    Returns the damage found."""
    cache = FeatureCache(Path(path), group)
    if DONE in cache.missing_arrays():
        raise CacheError(f"{path}: its completion flags ({DONE}) are missing; rerun extract with --overwrite")
    for name in cache.missing_arrays():
        create_layer_array(group, name, *arrays[name], dtype)
    damaged = cache.verify(chunks=chunks)
    flags = group[DONE]
    for c in sorted({c for cs in damaged.values() for c in cs}):
        flags[c] = 0
    return damaged


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on folder `path` (flock) for the block: shards swapping a cache take turns."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


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
    def open(cls, path: Path | str, *, allow_incomplete: bool = False, check_arrays: bool = True) -> FeatureCache:
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
        missing = cache.missing_arrays() if check_arrays else []
        if missing:
            raise CacheError(
                f"{path}: the array of {missing[0]!r} is missing (a damaged cache); rerun the same "
                "`blobenc extract` command to recompute it"
            )
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
            file = self.chunk_file(arr, c)
            if not file.is_file():  # zarr would read the fill value: zeros taken for features
                raise self.damaged(layer, c, "its file is missing")
            if len(positions) * SPARSE_FRACTION < chunk:
                with phase("read by byte range"):  # --profile shows which route the reads took
                    block = self._read_sparse(layer, c, local, file)
            if block is None:
                with phase("read whole chunk"):
                    block = self.read_chunk(layer, c)[local]
            if view is not None and self.attrs["views"] > 1:
                block = block[:, view]
            yield positions, block

    def chunk_file(self, arr: zarr.Array, c: int) -> Path:
        return self.path / arr.path / arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))

    def damaged(self, layer: str, c: int, why: str) -> CacheError:
        return CacheError(
            f"{self.path}: chunk {c} of layer {layer!r} is damaged ({why}); rerun the same `blobenc extract` "
            f"command to recompute it (`blobenc info {self.path} --verify` lists every damaged chunk)"
        )

    def read_chunk(self, layer: str, c: int) -> np.ndarray:
        """Chunk `c` of a layer, whole, its checksum checked."""
        arr = self.array(layer)
        chunk = self.attrs["chunk_images"]
        try:
            return arr[c * chunk : min((c + 1) * chunk, arr.shape[0])]
        except (ValueError, OSError) as e:  # a wrong checksum, a short or unreadable file
            raise self.damaged(layer, c, str(e).splitlines()[0] if str(e) else type(e).__name__) from None

    def _read_sparse(self, layer: str, c: int, local: np.ndarray, file: Path) -> np.ndarray | None:
        """Rows `local` of chunk `c` read by byte range from its file; None where that layout does
        not hold (compressed or transposed chunks). The file's size is checked (its checksum only
        when the whole chunk is read)."""
        arr = self.array(layer)
        meta = arr.metadata
        codecs = [type(c) for c in meta.codecs]
        if codecs not in ([BytesCodec], [BytesCodec, Crc32cCodec]):
            return None
        if arr.dtype.itemsize > 1 and meta.codecs[0].endian.value != sys.byteorder:
            return None
        if tuple(meta.chunk_grid.chunk_shape[1:]) != arr.shape[1:]:
            return None
        out = np.empty((len(local), *arr.shape[1:]), dtype=arr.dtype)
        row_bytes = int(np.prod(arr.shape[1:])) * arr.dtype.itemsize
        expected = meta.chunk_grid.chunk_shape[0] * row_bytes + 4 * (len(codecs) - 1)
        fd = os.open(file, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size != expected:
                raise self.damaged(layer, c, f"{size} bytes, expected {expected}")
            for j, r in enumerate(local.tolist()):
                os.preadv(fd, [memoryview(out[j]).cast("B")], r * row_bytes)
        finally:
            os.close(fd)
        return out

    def missing_arrays(self) -> list[str]:
        """Layer arrays (and the completion flags) the attributes name but the store lacks."""
        # each name looked up, not the folder listed: zarr warns about every other file there
        # (extract --profile's profile.json)
        return [name for name in [*self.layers, DONE] if name not in self.group]

    def verify(self, progress: bool = False, chunks: Sequence[int] | None = None) -> dict[str, list[int]]:
        """Read every finished chunk (of `chunks`, default all) of every layer, checking its file
        and checksum: the damaged chunks of each layer (every chunk of a missing array), empty
        when the cache is sound."""
        from blobenc.progress import track

        missing = set(self.missing_arrays())
        if DONE in missing:
            return {DONE: []}
        done = np.flatnonzero(self.done_flags()).tolist()
        if chunks is not None:
            done = sorted(set(done) & set(chunks))
        bad: dict[str, list[int]] = {}
        for layer in track(self.layers, "verifying", progress, len(self.layers)):
            if layer in missing:
                bad[layer] = done
                continue
            for c in done:
                try:
                    if not self.chunk_file(self.array(layer), c).is_file():
                        raise self.damaged(layer, c, "its file is missing")
                    self.read_chunk(layer, c)
                except CacheError:
                    bad.setdefault(layer, []).append(c)
        return bad

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
        views = [a["views"]] if a["views"] > 1 else []
        shapes = {layer: views + list(a["layer_shapes"][layer]) for layer in self.layers}  # arrays may be missing
        row_bytes = {layer: int(np.prod(shapes[layer])) * itemsize for layer in self.layers}
        # zarr stores a partial last chunk at full size, so the codec's ratio is over whole chunks
        logical = sum(row_bytes.values()) * done * a["chunk_images"]
        return {
            "path": str(self.path),
            "model": a["model"],
            "trunk": a["trunk"],
            "weights_fingerprint": a["weights_fingerprint"],
            "preprocessing": a["preprocessing"],
            "layers": {layer: {"shape": shapes[layer], "bytes_on_disk": on_disk[layer]} for layer in self.layers},
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
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
