"""What the cache's per-chunk CRC32C costs: write and whole-chunk read rates of one layer-shaped
array stored plain and with zarr's crc32c codec, in one run (docs/benchmarks.md, issue #22).

    python benchmarks/checksum.py [--images 2048] [--workdir /tmp/bench-crc]

Reads are the best of 5 from the page cache (the codec's CPU cost, not the disk's rate)."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-crc"))
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.images, 101, 256)).astype(np.float16)
    rows = {}
    for name, codecs in (("plain", None), ("crc32c", [Crc32cCodec()])):
        path = args.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        group = zarr.open_group(path, mode="w", zarr_format=3)
        arr = group.create_array(
            "x", shape=x.shape, chunks=(128, *x.shape[1:]), dtype="float16", compressors=codecs, fill_value=0
        )
        t = time.perf_counter()
        arr[:] = x
        write = x.nbytes / (time.perf_counter() - t) / 1e9
        read = max(x.nbytes / _timed(lambda a=arr: a[:]) / 1e9 for _ in range(5))
        rows[name] = (write, read)
    print(f"{x.nbytes / 1e6:.0f} MB, chunks of 128 images x 101 x 256 float16")
    print("| store | write GB/s | whole-chunk read GB/s |\n| --- | --- | --- |")
    for name, (w, r) in rows.items():
        print(f"| {name} | {w:.2f} | {r:.2f} |")
    (pw, pr), (cw, cr) = rows["plain"], rows["crc32c"]
    print(f"crc32c / plain: write {cw / pw:.2f}, read {cr / pr:.2f}")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
