"""`blobenc extract`: run a trunk once over every image and cache several layers (docs/commands.md)."""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import TextColumn
from torch.utils.data import DataLoader

from blobenc.defaults import DEFAULT_LAYERS
from blobenc.errors import CacheError, ConfigError
from blobenc.features import cache as cache_mod
from blobenc.features.images import ImageViews
from blobenc.features.trunk import (
    LayerCapture,
    TrunkSpec,
    all_layer_shapes,
    augment_transform,
    create_trunk,
    eval_transform,
    layer_features,
    layer_shapes,
    preprocessing,
    resolve_layers,
    to_store,
    weights_fingerprint,
)
from blobenc.plan import BASELINE, MemoryPlan, available_memory
from blobenc.profile import phase
from blobenc.progress import make_progress
from blobenc.runtime import autocast, default_workers, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

STORE_DTYPES = ("float16", "float32")
# Chunk size: ~16 MiB per chunk of the largest layer (docs/benchmarks.md has the measurements).
TARGET_CHUNK_BYTES = 16 << 20
# Live activations of a forward pass in units of the trunk's largest module output: the residual
# stream, the block's input and its widest intermediate (inference mode frees the rest).
ACTIVATION_FACTOR = 4
# Chunks in memory at once: two being filled (a batch may straddle a boundary), two queued for the
# writer and the one it is writing.
CHUNKS_HELD = 5


@dataclass(frozen=True)
class ExtractConfig:
    trunk: TrunkSpec = field(default_factory=TrunkSpec)
    layers: tuple[str, ...] = DEFAULT_LAYERS
    store_dtype: str = "float16"
    pool: int | None = None
    views: int = 1
    crop_scale: float = 0.8
    batch_size: int = 32
    num_workers: int | None = None
    chunk_images: int | None = None
    device: str = "auto"
    precision: str = "auto"

    def check(self) -> None:
        if self.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"--store-dtype {self.store_dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
        if self.pool is not None and self.pool < 1:
            raise ConfigError(f"--pool {self.pool}: expected a grid side of at least 1")
        if self.views < 1:
            raise ConfigError(f"--views {self.views}: expected at least 1")
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"--crop-scale {self.crop_scale}: expected a fraction in (0, 1]")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}: expected at least 1")
        if self.chunk_images is not None and self.chunk_images < 1:
            raise ConfigError(f"--chunk-images {self.chunk_images}: expected at least 1")


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' (0-based I); without it, torchrun's RANK/WORLD_SIZE; else the whole store (0/1)."""
    if text is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {text!r}: expected 0 <= I < N")
    return i, n


class _BackgroundWriter:
    """Writes finished chunks on a thread so the model never waits on the disk.

    Data for every layer is written before the chunk's completion flag; at most
    `max_pending` chunks wait in memory.
    """

    def __init__(self, group, layers: list[str], max_pending: int = 2):
        self._arrays = {name: group[name] for name in layers}
        self._done = group[cache_mod.DONE]
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self.bytes_written = 0
        self.chunks_written = 0
        self._thread = threading.Thread(target=self._run, name="blobenc-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks
            chunk, start, buffers = item
            try:
                for name, buf in buffers.items():
                    self._arrays[name][start : start + len(buf)] = buf
                self._done[chunk] = 1
                self.bytes_written += sum(b.nbytes for b in buffers.values())
                self.chunks_written += 1
            except BaseException as e:  # re-raised in the producer's thread by put/close
                self._error = e

    def put(self, chunk: int, start: int, buffers: dict[str, np.ndarray]) -> None:
        self._raise()
        self._queue.put((chunk, start, buffers))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise CacheError(f"writing the cache failed: {self._error}") from self._error


def extract(
    keys: list[str],
    paths: list[Path],
    out: Path | str,
    config: ExtractConfig = ExtractConfig(),
    *,
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: bool = True,
    max_memory: int | None = None,
) -> dict:
    """Fill the feature cache at `out` with `config`'s layers for every image; resumes an incomplete one.

    Its plan (extract_plan: memory, and the bytes left to write) is logged before any work and
    refused beyond `max_memory` (bytes; None: the memory available) or the disk's free space.

    Returns a summary: images done by this call, images/s, MB written, chunks complete/total.
    """
    config.check()
    out = Path(out)
    device = resolve_device(config.device)
    amp_dtype = resolve_precision(config.precision, device)
    with phase("load trunk"):
        model = create_trunk(config.trunk)
        prep = preprocessing(model)
        layers = resolve_layers(model, config.layers)
        shapes = layer_shapes(model, layers, prep, config.pool)
        fingerprint = weights_fingerprint(model)

    view_shape = (config.views,) if config.views > 1 else ()
    itemsize = np.dtype(config.store_dtype).itemsize
    row_bytes = {n: int(np.prod(view_shape + tuple(s))) * itemsize for n, s in shapes.items()}
    chunk_images = config.chunk_images or int(np.clip(TARGET_CHUNK_BYTES // max(row_bytes.values()), 1, 4096))
    ranges = cache_mod.chunk_ranges(len(keys), chunk_images)
    attrs = {
        "format": cache_mod.FORMAT,
        "version": cache_mod.VERSION,
        "model": config.trunk.model,
        "trunk": config.trunk.to_dict(),  # how the weights were obtained; the fingerprint is what must match
        "weights_fingerprint": fingerprint,
        "preprocessing": prep,
        "layers": layers,
        "layer_shapes": shapes,
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 0)),
        "dtype": config.store_dtype,
        "pool": config.pool,
        "views": config.views,
        "crop_scale": config.crop_scale if config.views > 1 else None,
        "chunk_images": chunk_images,
        "n_chunks": len(ranges),
        "images": list(keys),
    }
    arrays = {n: ((len(keys), *view_shape, *s), (chunk_images, *view_shape, *s)) for n, s in shapes.items()}
    held = min(CHUNKS_HELD, len(ranges)) * min(chunk_images, len(keys)) * sum(row_bytes.values())
    plan = extract_plan(model, prep, layers, config, held)
    final = out
    if overwrite and cache_mod.is_cache(out):  # the new cache is built beside the old one, swapped in when whole
        out = out.parent / f".{out.name}.new"
        if cache_mod.is_cache(out) and cache_mod.identity_difference(out, attrs) is not None:
            shutil.rmtree(out)  # an earlier --overwrite's, of other settings
    new = not cache_mod.is_cache(out)
    if new:  # refused before the store exists; a resume is checked below, on what is left
        mine = cache_mod.shard_chunks(len(ranges), *shard)
        _check_plan(plan, sum(ranges[c][1] - ranges[c][0] for c in mine) * sum(row_bytes.values()), out, max_memory)
    group = cache_mod.create_or_open(out, attrs, arrays)
    if not new:  # what an earlier run left may be damaged: those chunks are computed again
        damaged = cache_mod.repair(
            out, group, arrays, config.store_dtype, list(cache_mod.shard_chunks(len(ranges), *shard))
        )
        for layer, chunks in damaged.items():
            logger.warning("%s: layer %s: %d damaged chunk(s) recomputed: %s", out, layer, len(chunks), chunks[:10])

    done = group[cache_mod.DONE][:].astype(bool)
    mine = [c for c in cache_mod.shard_chunks(len(ranges), *shard) if not done[c]]
    rows = [r for c in mine for r in range(*ranges[c])]
    if not new:
        _check_plan(plan, len(rows) * sum(row_bytes.values()), out, max_memory)
    summary = {
        "cache": str(final),
        "images_total": len(keys),
        "chunks_total": len(ranges),
        "chunk_images": chunk_images,
        "shard": f"{shard[0]}/{shard[1]}",
        "images_done": 0,
        "seconds": 0.0,
        "images_per_s": 0.0,
        "mb_written": 0.0,
    }
    if not rows:
        summary["chunks_done"] = int(group[cache_mod.DONE][:].sum())
        _swap_in(out, final)
        return summary
    logger.info(
        "extracting %d images (%d chunks of %d) from %s with %s",
        len(rows),
        len(mine),
        chunk_images,
        config.trunk.model,
        ", ".join(layers),
    )

    dataset = ImageViews(
        paths,
        rows,
        eval_transform(prep),
        prep["input_size"],
        config.views,
        augment_transform(prep, config.crop_scale) if config.views > 1 else None,
        seed=config.trunk.seed,
    )
    workers = default_workers(device) if config.num_workers is None else config.num_workers
    loader = DataLoader(
        dataset, batch_size=config.batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda"
    )
    model.to(device)
    capture = LayerCapture(model, layers)
    writer = _BackgroundWriter(group, layers)
    prefix = attrs["num_prefix_tokens"]
    open_chunks: dict[int, dict[str, np.ndarray]] = {}
    filled: dict[int, int] = {}
    n_done, t0 = 0, time.perf_counter()
    progress_bar = make_progress(TextColumn("{task.fields[rate]}"), enabled=progress)
    batches = iter(loader)
    try:
        with progress_bar, torch.inference_mode():
            task = progress_bar.add_task("extracting", total=len(rows), rate="")
            while True:
                with phase("read images"):  # waiting for decoded images (decoding itself with 0 workers)
                    item = next(batches, None)
                if item is None:
                    break
                batch_rows, x, errs = item
                bad = [e for e in errs if e]
                if bad:
                    raise CacheError(
                        f"{bad[0]}; the chunks finished before it are kept: "
                        "fix the file and rerun the same command to resume"
                    )
                b = x.shape[0]
                with phase("forward"):
                    x = x.flatten(0, 1).to(device, non_blocking=True)
                    with autocast(device, amp_dtype):
                        feats = capture(x)
                with phase("to host"):
                    host = {}
                    for name, f in zip(layers, layer_features(feats, layers, config.pool, prefix), strict=True):
                        host[name] = to_store(name, f.reshape(b, *view_shape, *f.shape[1:]), config.store_dtype)
                    del feats
                    batch_rows = batch_rows.numpy()
                    chunk_ids = batch_rows // chunk_images
                    full = []
                    for c in np.unique(chunk_ids):
                        sel = chunk_ids == c
                        start, stop = ranges[c]
                        if c not in open_chunks:
                            open_chunks[c] = {
                                n: np.empty((stop - start, *h.shape[1:]), h.dtype) for n, h in host.items()
                            }
                            filled[c] = 0
                        lo = int(batch_rows[sel][0]) - start
                        for n, h in host.items():
                            open_chunks[c][n][lo : lo + int(sel.sum())] = h[sel]
                        filled[c] += int(sel.sum())
                        if filled[c] == stop - start:
                            full.append((int(c), start))
                with phase("write"):  # waiting for the writer thread when 2 chunks are queued already
                    for c, start in full:
                        writer.put(c, start, open_chunks.pop(c))
                n_done += b
                elapsed = time.perf_counter() - t0
                progress_bar.update(
                    task,
                    advance=b,
                    rate=f"{n_done / elapsed:.1f} img/s {writer.bytes_written / 1e6 / elapsed:.1f} MB/s",
                )
    finally:
        capture.remove()
        with phase("write"):
            writer.close()  # always flush the finished chunks, error or not
    seconds = time.perf_counter() - t0
    summary.update(
        images_done=n_done,
        seconds=seconds,
        images_per_s=n_done / seconds,
        mb_written=writer.bytes_written / 1e6,
        chunks_done=int(group[cache_mod.DONE][:].sum()),
    )
    _swap_in(out, final)
    return summary


def _swap_in(built: Path, final: Path) -> None:
    """extract --overwrite: once the cache built beside `final` is complete (every shard's part),
    it replaces the old one; until then the old one stays whole."""
    if built == final or not built.exists():
        return
    with cache_mod.locked(built.parent):
        if not built.exists() or not cache_mod.FeatureCache.open(built, allow_incomplete=True).complete:
            return  # another shard swapped it in, or has chunks left to write
        old = final.parent / f".{final.name}.old"
        final.rename(old)
        built.rename(final)
        shutil.rmtree(old)
    logger.info("%s: replaced by the new cache", final)


def extract_plan(
    model: torch.nn.Module, prep: dict, layers: list[str], config: ExtractConfig, chunks: int
) -> MemoryPlan:
    """extract's memory from the trunk's shapes (one dummy forward of every module): its weights
    throughout; per batch the decoded images, the live activations (ACTIVATION_FACTOR x the
    largest module output), the captured layers in float32, and `chunks` bytes of the cache's
    chunks (up to CHUNKS_HELD of them).
    DataLoader workers are processes of their own and not counted."""
    shapes = dict(all_layer_shapes(model, prep))
    out_bytes = {n: 4 * math.prod(s) for n, s in shapes.items() if s}
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    b = config.batch_size * config.views
    plan = MemoryPlan("extract", {"baseline": BASELINE, "trunk": weights})
    plan.phases["forward"] = {
        "images": 2 * b * 4 * math.prod(prep["input_size"]),
        "activations": ACTIVATION_FACTOR * b * max(out_bytes.values()),
        "layers": b * sum(out_bytes.get(n, 0) for n in layers),
        "chunks": chunks,
    }
    return plan


def _check_plan(plan: MemoryPlan, disk: int, out: Path, max_memory: int | None) -> None:
    plan.disk = disk
    plan.check(available_memory() if max_memory is None else max_memory, "lower --batch-size or --chunk-images")
    plan.check_disk(out, "free space, or write less: --pool N, fewer --layers, or --store-dtype float16")
    logger.info(plan.describe())
