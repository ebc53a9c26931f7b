"""Extraction benchmark: one run, one table (docs/benchmarks.md records the figures).

    python benchmarks/extract.py [--images 256] [--model vit_tiny_patch16_224] [--device auto]

Measures, on the same images, loader, batch size and precision:
  * the bare trunk forward (no hooks, no copies, no writes), images/s;
  * `extract` into a fresh cache, images/s, and their ratio (target >= 0.95);
  * bytes per image, write MB/s, and the zstd compression ratio of a real fp16 chunk;
  * a sequential read of the whole cache through zarr against a raw read of the same files.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import zarr
from _report import report, synthetic_workdir
from numcodecs import Zstd
from torch.utils.data import DataLoader

from blobenc.data.algonauts import AlgonautsDataset
from blobenc.data.synth import SynthConfig
from blobenc.features.cache import FeatureCache
from blobenc.features.extract import ExtractConfig, default_workers, extract
from blobenc.features.images import ImageViews
from blobenc.features.trunk import TrunkSpec, create_trunk, eval_transform, preprocessing
from blobenc.runtime import autocast, resolve_device, resolve_precision


def bare_forward(paths, trunk: TrunkSpec, batch_size: int, workers: int, device, amp) -> float:
    model = create_trunk(trunk).to(device)
    prep = preprocessing(model)
    ds = ImageViews(paths, range(len(paths)), eval_transform(prep), prep["input_size"])
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    t0 = time.perf_counter()
    with torch.inference_mode():
        for _, x, _ in loader:
            with autocast(device, amp):
                model(x.flatten(0, 1).to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - t0)


def read_rates(path: Path, layers: list[str]) -> tuple[float, float, int]:
    """(zarr MB/s, raw MB/s, bytes) reading every layer's chunks in order."""
    files = sorted(f for layer in layers for f in (path / layer).rglob("*") if f.is_file() and f.name != "zarr.json")
    nbytes = sum(f.stat().st_size for f in files)
    t0 = time.perf_counter()
    for f in files:
        with f.open("rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
    raw = nbytes / (time.perf_counter() - t0) / 1e6
    g = zarr.open_group(path, mode="r")
    t0 = time.perf_counter()
    for layer in layers:
        a = g[layer]
        for start in range(0, a.shape[0], a.chunks[0]):
            a[start : start + a.chunks[0]]
    return nbytes / (time.perf_counter() - t0) / 1e6, raw, nbytes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="number of synthetic images")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--layers", nargs="+", default=["blocks.[0369]", "blocks.11"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temp folder)")
    args = p.parse_args(argv)

    n_train = max(2, args.images // 2)
    synth = SynthConfig(subjects=1, train_images=n_train, test_images=args.images - n_train, image_size=425)
    work, data = synthetic_workdir(args.workdir, "blobenc-bench-", synth)
    index = AlgonautsDataset(data).unique_images()
    keys, paths = index.keys, list(index.paths)
    device = resolve_device(args.device)
    amp = resolve_precision(args.precision, device)
    workers = default_workers() if args.workers is None else args.workers
    trunk = TrunkSpec(args.model, pretrained=False)
    torch.set_num_threads(torch.get_num_threads())

    bare_forward(paths[: args.batch_size], trunk, args.batch_size, workers, device, amp)  # warm-up
    bare = bare_forward(paths, trunk, args.batch_size, workers, device, amp)
    cfg = ExtractConfig(
        trunk=trunk,
        layers=tuple(args.layers),
        batch_size=args.batch_size,
        num_workers=workers,
        device=args.device,
        precision=args.precision,
    )
    out = work / "cache"
    summary = extract(keys, paths, out, cfg, overwrite=True, progress=False)
    info = FeatureCache.open(out).info()
    g = zarr.open_group(out, mode="r")
    chunk = g[info_layer := next(iter(info["layers"]))][: g[info_layer].chunks[0]]
    zstd_ratio = chunk.nbytes / len(Zstd(level=3).encode(np.ascontiguousarray(chunk)))
    read_rates(out, list(info["layers"]))  # warm the page cache so both reads see the same state
    zarr_mbs, raw_mbs, nbytes = read_rates(out, list(info["layers"]))

    max_layer_bytes = max(np.prod(d["shape"]) for d in info["layers"].values()) * np.dtype(info["dtype"]).itemsize
    amp_name = "fp32" if amp is None else str(amp).removeprefix("torch.")
    title = (
        f"extract: {args.model}, {len(keys)} images, {device.type} {amp_name}, "
        f"batch {args.batch_size}, {workers} workers, {torch.get_num_threads()} threads"
    )
    rows = [
        ("bare trunk forward (img/s)", f"{bare:.1f}"),
        ("extract into cache (img/s)", f"{summary['images_per_s']:.1f}"),
        ("[bold]ratio extract / bare", f"[bold]{summary['images_per_s'] / bare:.3f}"),
        ("layers", ", ".join(info["layers"])),
        ("bytes per image (float16)", f"{info['bytes_per_image'] / 1e6:.3f} MB"),
        ("chunk per layer", f"{info['chunk_images']} images, {info['chunk_images'] * max_layer_bytes / 2**20:.1f} MiB"),
        ("write rate (MB/s)", f"{summary['mb_written'] / summary['seconds']:.1f}"),
        ("stored compression ratio (no codec)", f"{info['compression_ratio']:.3f}"),
        ("zstd-3 ratio on one fp16 chunk", f"{zstd_ratio:.3f}"),
        ("sequential read via zarr (MB/s)", f"{zarr_mbs:.0f}"),
        ("raw read of the same files (MB/s)", f"{raw_mbs:.0f}"),
        ("[bold]ratio zarr / raw read", f"[bold]{zarr_mbs / raw_mbs:.3f}"),
        ("bytes read", f"{nbytes / 1e6:.0f} MB"),
    ]
    report(title, rows)


if __name__ == "__main__":
    main()
