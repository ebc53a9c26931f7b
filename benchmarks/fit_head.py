"""fit-head benchmark: one run, one table (docs/benchmarks.md records the figures).

    python benchmarks/fit_head.py [--model eva02_base_patch14_224.mim_in22k] [--device auto]

Measures, with the reference trunk's layers (random init) and head sizes:
  * head training steps fed from the in-memory cache, samples/s;
  * the same head fed by the trunk run on the images every batch (phase 1 the old way), samples/s;
    their ratio (target >= 100x for a ViT-B-size trunk);
  * wall time of fit-head with an 8-trial sweep against one trial (target <= 2x).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from _report import report

from blobenc.data.algonauts import AlgonautsDataset
from blobenc.data.synth import SynthConfig, write_synthetic
from blobenc.features.cache import FeatureCache
from blobenc.features.extract import ExtractConfig, extract
from blobenc.features.images import ImageViews
from blobenc.features.trunk import LayerCapture, TrunkSpec, create_trunk, eval_transform
from blobenc.heads import create_head
from blobenc.runtime import autocast, resolve_device, resolve_precision
from blobenc.train.config import HeadConfig, sweep_configs
from blobenc.train.data import HeadData
from blobenc.train.fit import fit_head
from blobenc.train.loop import Trial, train_step


def make_trial(data: HeadData, cfg: HeadConfig, device, steps: int) -> Trial:
    torch.manual_seed(0)
    model = create_head(
        "group_linear",
        layer_shapes=data.layer_shapes,
        n_subjects=len(data.subjects),
        n_vertices=data.group.n_vertices,
        hidden_dim=cfg.hidden_dim,
        proj_dim=cfg.proj_dim,
        dropout=cfg.dropout,
    ).to(device)
    trial = Trial("bench", cfg, model, list(range(len(data.layers))))
    trial.setup(steps)
    return trial


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="eva02_base_patch14_224.mim_in22k")
    p.add_argument("--layers", nargs="+", default=["blocks.[02468]", "blocks.10"])
    p.add_argument("--train-images", type=int, default=40, help="per subject (2 subjects)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden-dim", type=int, default=1024)
    p.add_argument("--trunk-batches", type=int, default=2, help="batches timed on the trunk path")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the sweep comparison")
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="blobenc-bench-head-"))
    data_root = work / "data"
    if not data_root.exists():
        write_synthetic(data_root, SynthConfig(subjects=2, train_images=args.train_images, test_images=8))
    ds = AlgonautsDataset(data_root)
    device = resolve_device(args.device)
    amp = resolve_precision("auto", device)
    trunk = TrunkSpec(args.model, pretrained=False)
    cache_path = work / "cache"
    index = ds.unique_images()
    t0 = time.perf_counter()
    extract(
        index.keys,
        list(index.paths),
        cache_path,
        ExtractConfig(trunk=trunk, layers=tuple(args.layers), batch_size=16, device=args.device),
        progress=False,
    )
    extract_s = time.perf_counter() - t0
    cache = FeatureCache.open(cache_path)
    split = ds.validation_split(0.2, 0)
    cfg = HeadConfig(batch_size=args.batch_size, hidden_dim=args.hidden_dim, proj_dim=64, device=args.device)
    data = HeadData(cache, ds, split, None, device)
    n_train = len(data.sets["train"])
    rng = np.random.default_rng(0)

    # 1. head from the cache: gather + one optimizer step per batch
    trial = make_trial(data, cfg, device, 1000)
    batches = [rng.choice(n_train, args.batch_size) for _ in range(20)]
    train_step(trial, *data.batch("train", batches[0]), device, amp)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for idx in batches:
        train_step(trial, *data.batch("train", idx), device, amp)
    sync(device)
    cache_rate = len(batches) * args.batch_size / (time.perf_counter() - t0)

    # 2. the same head, fed by the frozen trunk on the images every batch
    model = create_trunk(trunk).to(device)
    prep = cache.attrs["preprocessing"]
    capture = LayerCapture(model, cache.layers)
    s = data.sets["train"]
    paths = [index.paths[r] for r in data.cache_rows]  # the image of each in-memory feature row
    images = ImageViews(paths, range(len(paths)), eval_transform(prep), prep["input_size"])
    trial = make_trial(data, cfg, device, 1000)
    sync(device)
    t0 = time.perf_counter()
    for idx in batches[: args.trunk_batches]:
        x = torch.stack([images[int(r)][1][0] for r in s.feature_row[idx]]).to(device)
        with torch.inference_mode(), autocast(device, amp):
            feats = capture(x)
        feats = [f.float().clone() for f in feats.values()]
        subject = torch.as_tensor(s.subject[idx], device=device)
        train_step(trial, feats, subject, s.target[idx], data.masks[subject], device, amp)
    sync(device)
    trunk_rate = args.trunk_batches * args.batch_size / (time.perf_counter() - t0)
    capture.remove()

    # 3. one-pass sweep: 8 trials against 1, whole fit-head wall time
    base = HeadConfig(
        epochs=args.epochs, batch_size=args.batch_size, hidden_dim=args.hidden_dim, proj_dim=64, device=args.device
    )
    t0 = time.perf_counter()
    fit_head(cache_path, data_root, work / "one", [base], progress=False)
    one_s = time.perf_counter() - t0
    grid = sweep_configs(base, ["lr=3e-4,6e-4", "dropout=0.5,0.9", "weight_decay=0.1,0.8"])
    t0 = time.perf_counter()
    fit_head(cache_path, data_root, work / "eight", grid, progress=False)
    eight_s = time.perf_counter() - t0

    shapes = ", ".join(f"{n} {tuple(v)}" for n, v in list(cache.attrs["layer_shapes"].items())[:1])
    title = (
        f"fit-head: {args.model} layers ({len(cache.layers)}x {shapes}), hidden {args.hidden_dim}, "
        f"batch {args.batch_size}, {device.type}, {torch.get_num_threads()} threads"
    )
    rows = [
        ("head from in-memory cache (samples/s)", f"{cache_rate:.1f}"),
        ("head fed by the trunk every batch (samples/s)", f"{trunk_rate:.2f}"),
        ("[bold]speedup cache / trunk", f"[bold]{cache_rate / trunk_rate:.0f}x"),
        (f"fit-head, 1 trial, {args.epochs} epochs, {n_train} samples (s)", f"{one_s:.1f}"),
        ("fit-head, 8-trial sweep, one pass (s)", f"{eight_s:.1f}"),
        ("[bold]ratio 8 trials / 1 trial", f"[bold]{eight_s / one_s:.2f}"),
        ("extraction of the cache (s, images)", f"{extract_s:.1f}, {len(index)}"),
        ("cache in memory (MB)", f"{data.features.nbytes / 1e6:.0f}"),
    ]
    report(title, rows)


if __name__ == "__main__":
    main()
