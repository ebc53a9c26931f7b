"""fit-head benchmark: one run, one table (docs/benchmarks.md records the figures).

    python benchmarks/fit_head.py [--model eva02_base_patch14_224.mim_in22k] [--device auto]

With the reference trunk's layers (random init) and the reference head sizes (hidden 1024,
P 2048 latent dims, 39548 group vertices), for full tokens and for `extract --pool 4` tokens:
  * head training steps fed from the in-memory cache, samples/s, with the loss through the
    frozen embedding (what fit-head does) and in group space (V x P embedding every step);
  * the same head fed by the trunk run on the images every batch (phase 1 the old way), samples/s;
    their ratio (target >= 100x for a ViT-B-size trunk);
  * wall time of fit-head with an 8-trial sweep against one trial (target <= 2x).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from _report import report, synthetic_workdir

from blobenc.data.algonauts import AlgonautsDataset
from blobenc.data.synth import SynthConfig
from blobenc.features.cache import FeatureCache
from blobenc.features.extract import ExtractConfig, extract
from blobenc.features.images import ImageViews
from blobenc.features.trunk import LayerCapture, TrunkSpec, create_trunk, eval_transform, pool_features
from blobenc.heads import create_head
from blobenc.runtime import autocast, resolve_device, resolve_precision
from blobenc.train.config import HeadConfig, sweep_configs
from blobenc.train.data import HeadData
from blobenc.train.fit import fit_head
from blobenc.train.loop import Trial, train_step


def make_trial(data: HeadData, cfg: HeadConfig, embedding: tuple, device, steps: int = 1000) -> Trial:
    torch.manual_seed(0)
    model = create_head(
        "group_linear",
        layer_shapes=data.layer_shapes,
        n_subjects=len(data.subjects),
        n_vertices=data.group.n_vertices,
        hidden_dim=cfg.hidden_dim,
        proj_dim=cfg.proj_dim,
        dropout=cfg.dropout,
    )
    model.set_embedding(embedding[0].T, embedding[1])
    trial = Trial("bench", cfg, model.to(device), list(range(len(data.layers))))
    trial.setup(steps)
    return trial


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, batches, batch_size, device) -> float:
    """samples/s of fn(idx) over the batches, after one warm-up call."""
    fn(batches[0])
    sync(device)
    t0 = time.perf_counter()
    for idx in batches:
        fn(idx)
    sync(device)
    return len(batches) * batch_size / (time.perf_counter() - t0)


def group_space_step(trial: Trial, data: HeadData, targets, observed, idx, device, amp) -> None:
    """One step with the loss in group space: the V x P embedding applied every step (the old way)."""
    s = data.sets["train"]
    subject = torch.as_tensor(s.subject[idx], device=device)
    trial.model.train()
    trial.optimizer.zero_grad(set_to_none=True)
    with autocast(device, amp):
        pred = trial.model(data.features_of("train", idx), subject).float()
    m = observed[idx]
    (((pred - targets[idx]) ** 2) * m).sum().div(m.sum()).backward()
    trial.optimizer.step()


def regime(name: str, cache_path: Path, ds, split, trunk_spec, args, device, amp, work: Path) -> list:
    cache = FeatureCache.open(cache_path)
    data = HeadData(cache, ds, split, None, device)
    n_train = len(data.sets["train"])
    cfg = HeadConfig(batch_size=args.batch_size, hidden_dim=args.hidden_dim, proj_dim=args.proj_dim, device=args.device)
    # a reference-size embedding (orthonormal columns, like PCA components); the samples are too few to fit one
    generator = torch.Generator().manual_seed(0)
    weight = torch.linalg.qr(torch.randn(data.group.n_vertices, args.proj_dim, generator=generator))[0]
    embedding = (weight, torch.zeros(data.group.n_vertices))
    data.embed(*embedding)
    rng = np.random.default_rng(0)
    batches = [rng.choice(n_train, args.batch_size) for _ in range(args.batches)]

    # 1. head from the cache, loss through the embedding (fit-head) and in group space (before)
    trial = make_trial(data, cfg, embedding, device)
    cache_rate = timed(
        lambda idx: train_step(
            trial, *data.training_batch(idx, data.features_of("train", idx)), data.targets, device, amp
        ),
        batches,
        args.batch_size,
        device,
    )
    trial = make_trial(data, cfg, embedding, device)
    targets = torch.from_numpy(data.group_targets("train")).to(device)
    observed = torch.from_numpy(data.observed("train")).to(device)
    group_rate = timed(
        lambda idx: group_space_step(trial, data, targets, observed, idx, device, amp),
        batches[: max(2, args.batches // 4)],
        args.batch_size,
        device,
    )

    # 2. the same head, fed by the frozen trunk on the images every batch
    model = create_trunk(trunk_spec).to(device)
    attrs = cache.attrs
    prep = attrs["preprocessing"]
    capture = LayerCapture(model, cache.layers)
    index = ds.unique_images()
    paths = [index.paths[r] for r in data.cache_rows]  # the image of each in-memory feature row
    images = ImageViews(paths, range(len(paths)), eval_transform(prep), prep["input_size"])
    trial = make_trial(data, cfg, embedding, device)
    s = data.sets["train"]

    def trunk_step(idx):
        x = torch.stack([images[int(r)][1][0] for r in s.feature_row[idx]]).to(device)
        with torch.inference_mode(), autocast(device, amp):
            feats = capture(x)
        feats = [f.float().clone() for f in feats.values()]
        if attrs["pool"]:
            feats = [pool_features(f, attrs["pool"], attrs["num_prefix_tokens"]) for f in feats]
        train_step(trial, *data.training_batch(idx, feats), data.targets, device, amp)

    trunk_rate = timed(trunk_step, batches[: args.trunk_batches], args.batch_size, device)
    capture.remove()

    # 3. one-pass sweep: 8 trials against 1, whole fit-head wall time
    base = HeadConfig(epochs=args.epochs, batch_size=args.batch_size, hidden_dim=args.hidden_dim, device=args.device)
    t0 = time.perf_counter()
    fit_head(cache_path, ds.root, work / f"one-{name}", [base], progress=False)
    one_s = time.perf_counter() - t0
    grid = sweep_configs(base, ["lr=3e-4,6e-4", "dropout=0.5,0.9", "weight_decay=0.1,0.8"])
    t0 = time.perf_counter()
    fit_head(cache_path, ds.root, work / f"eight-{name}", grid, progress=False)
    eight_s = time.perf_counter() - t0

    shape = tuple(attrs["layer_shapes"][cache.layers[0]])
    return [
        (f"[bold]{name}: {len(cache.layers)} layers x {shape}, {data.features.nbytes / 1e6:.0f} MB in memory", ""),
        ("head from the cache, loss through the embedding (samples/s)", f"{cache_rate:.1f}"),
        ("head from the cache, loss in group space (samples/s)", f"{group_rate:.1f}"),
        ("head fed by the trunk every batch (samples/s)", f"{trunk_rate:.2f}"),
        ("[bold]speedup cache / trunk", f"[bold]{cache_rate / trunk_rate:.0f}x"),
        (f"fit-head, 1 trial, {args.epochs} epochs, {n_train} samples (s)", f"{one_s:.1f}"),
        ("fit-head, 8-trial sweep, one pass (s)", f"{eight_s:.1f}"),
        ("[bold]ratio 8 trials / 1 trial", f"[bold]{eight_s / one_s:.2f}"),
    ]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="eva02_base_patch14_224.mim_in22k")
    p.add_argument("--layers", nargs="+", default=["blocks.[02468]", "blocks.10"])
    p.add_argument("--pool", type=int, default=4, help="grid side of the pooled regime")
    p.add_argument("--train-images", type=int, default=40, help="per subject (2 subjects)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden-dim", type=int, default=1024)
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--batches", type=int, default=12, help="batches timed on the cache path")
    p.add_argument("--trunk-batches", type=int, default=2, help="batches timed on the trunk path")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the sweep comparison")
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)

    synth = SynthConfig(subjects=2, train_images=args.train_images, test_images=8, vertices="full")
    work, data_root = synthetic_workdir(args.workdir, "blobenc-bench-head-", synth)
    ds = AlgonautsDataset(data_root)
    device = resolve_device(args.device)
    amp = resolve_precision("auto", device)
    trunk = TrunkSpec(args.model, pretrained=False)
    split = ds.validation_split(0.2, 0)
    index = ds.unique_images()
    rows, extract_s = [], {}
    for name, pool in (("full tokens", None), (f"--pool {args.pool}", args.pool)):
        cache_path = work / f"cache-{pool or 'full'}"
        t0 = time.perf_counter()
        config = ExtractConfig(trunk=trunk, layers=tuple(args.layers), batch_size=16, device=args.device, pool=pool)
        extract(index.keys, list(index.paths), cache_path, config, progress=False)
        extract_s[name] = time.perf_counter() - t0
        rows += regime(name.split()[0].strip("-"), cache_path, ds, split, trunk, args, device, amp, work)
    rows.append((f"extraction of {len(index)} images (s)", ", ".join(f"{k} {v:.1f}" for k, v in extract_s.items())))
    title = (
        f"fit-head: {args.model}, hidden {args.hidden_dim}, P {args.proj_dim}, {ds.group.n_vertices} vertices, "
        f"batch {args.batch_size}, {device.type}, {torch.get_num_threads()} threads"
    )
    report(title, rows)


if __name__ == "__main__":
    main()
