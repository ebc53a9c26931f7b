"""fit-head benchmark: one table per section (docs/benchmarks.md records the figures).

    python benchmarks/fit_head.py [--sections speed checkpoints defaults halving] [--device auto]

speed: with the reference trunk's layers (random init) and the reference head sizes (hidden 1024,
P 2048 latent dims, 39548 group vertices), for full tokens and for `extract --pool 4` tokens:
  * head training steps fed from the in-memory cache, samples/s, with the loss through the
    frozen embedding (what fit-head does) and in group space (V x P embedding every step);
  * the same head fed by the trunk run on the images every batch (phase 1 the old way), samples/s;
  * wall time of fit-head with an 8-trial sweep against one trial.
checkpoints: checkpoint bytes written per epoch at the reference head sizes (8 subjects); run it
  with PYTHONPATH=OLD_CHECKOUT too for the before/after.
defaults: the default fit-head against the ridge stand-in (scikit-learn RidgeCV per subject on
  token-averaged features) at two data sizes (`--sizes`, images per subject; 8 subjects, real vertex
  counts, random-init vit_tiny): test score, validation, wall time, steps to the best epoch.
halving: 8 configs raced with --halving against one trial (the defaults).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI: waiting OpenMP threads sleep on a shared CPU

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
from blobenc.train.step import Trial, train_step


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


def checkpoint_bytes(work: Path, args, device) -> list:
    """Checkpoint bytes written per epoch by fit-head at the reference head sizes (hidden 1024,
    P 2048, 39548 group vertices; the reference trunk's layers pooled to 4 x 4): every checkpoint file
    fit-head writes through blobenc.train.checkpoint, counted as it is written. Runs on this version
    and on an older checkout (PYTHONPATH=OLD python benchmarks/fit_head.py --sections checkpoints)."""
    import inspect

    import blobenc.train.checkpoint as ckpt
    from blobenc.pca import GroupPCA

    synth = SynthConfig(subjects=8, train_images=12, test_images=4, vertices="full")  # the reference's 8 subject maps
    _, data_root = synthetic_workdir(work, "", synth)
    ds = AlgonautsDataset(data_root)
    cache_path = work / "cache-pool"
    if not (cache_path / "zarr.json").exists():
        index = ds.unique_images()
        trunk = TrunkSpec(args.model, pretrained=False)
        config = ExtractConfig(
            trunk=trunk, layers=tuple(args.layers), batch_size=16, device=args.device, pool=args.pool
        )
        extract(index.keys, list(index.paths), cache_path, config, progress=False)
    # a reference-size embedding (orthonormal components, like PCA's); too few samples to fit 2048
    pca_file = work / "pca-2048.safetensors"
    if not pca_file.exists():
        g = torch.Generator().manual_seed(0)
        pca = GroupPCA(args.proj_dim)
        pca.components_ = torch.linalg.qr(torch.randn(ds.group.n_vertices, args.proj_dim, generator=g))[0].T.numpy()
        pca.mean_ = np.zeros(ds.group.n_vertices, np.float32)
        pca.explained_variance_ = pca.explained_variance_ratio_ = np.full(args.proj_dim, 1 / args.proj_dim, np.float32)
        pca.group = ds.group
        pca.save(pca_file)
    written: list[tuple[str, int]] = []
    real_save = ckpt.save_file

    def counting_save(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        written.append((Path(path).name, Path(path).stat().st_size))

    ckpt.save_file = counting_save
    rows = []
    epochs = args.ckpt_epochs
    cfg = HeadConfig(
        epochs=epochs, batch_size=32, hidden_dim=args.hidden_dim, proj_dim=args.proj_dim, device=args.device
    )
    policies = [("default", {})]
    if "checkpoint_minutes" in inspect.signature(fit_head).parameters:
        policies.append(("--checkpoint-minutes 0 (every epoch)", {"checkpoint_minutes": 0}))
    for label, kw in policies:
        written.clear()
        out = work / f"ckpt-{len(rows)}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        fit_head(cache_path, data_root, out, [cfg], pca_path=pca_file, progress=False, **kw)
        during = [(n, b) for n, b in written if "val_vertex" not in n]  # training checkpoints only
        per_epoch = sum(b for _, b in during) / epochs
        files = {n.strip(".").removesuffix(".tmp"): b for n, b in during}
        rows.append((f"{label}: checkpoint bytes per epoch ({epochs} epochs)", f"{per_epoch / 1e6:.1f} MB"))
        rows.append((f"{label}: file sizes", ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in sorted(files.items()))))
    ckpt.save_file = real_save
    return rows


def small_dataset(work: Path, n_images: int, seed: int) -> tuple[Path, Path]:
    """An 8-subject synthetic dataset at the real vertex counts, n_images training images per subject,
    and its cache of a random-init vit_tiny (the README demo's trunk and layers): (data, cache)."""
    from blobenc.data.synth import write_synthetic

    root = work / f"n{n_images}-seed{seed}"
    data, cache = root / "data", root / "cache"
    if not data.exists():
        write_synthetic(data, SynthConfig(train_images=n_images, vertices="full", seed=seed))
    if not (cache / "zarr.json").exists():
        index = AlgonautsDataset(data).unique_images()
        trunk = TrunkSpec("vit_tiny_patch16_224", pretrained=False)
        config = ExtractConfig(trunk=trunk, layers=("blocks.[0369]", "blocks.11"), device="cpu")
        extract(index.keys, list(index.paths), cache, config, progress=False)
    return data, cache


def pooled_ridge(data: Path, cache_path: Path, split) -> dict:
    """The stand-in baseline: per subject, scikit-learn RidgeCV (alphas logspace(-1, 6, 15), one per
    vertex) on z-scored, token-averaged features of every cached layer, trained on the training part
    of `split`; validation median R² (pooled as fit-head's) and devkit test score, and seconds."""
    from sklearn.linear_model import RidgeCV

    from blobenc.scoring import pooled_r2, score_subject

    ds, cache = AlgonautsDataset(data), FeatureCache.open(cache_path)
    t0 = time.perf_counter()
    means = np.concatenate([cache.array(n)[:].astype(np.float32).mean(1) for n in cache.layers], 1)

    def pooled(keys):
        return means[cache.rows(list(keys))]

    preds, targets, observed, scores = [], [], [], []
    for name, s in ds.subjects.items():
        tr, va = split.rows(s)
        keys = np.asarray(s.keys["train"])
        x_tr, x_va, x_te = pooled(keys[tr]), pooled(keys[va]), pooled(s.keys["test"])
        mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
        y = s.responses("train")
        model = RidgeCV(alphas=np.logspace(-1, 6, 15), alpha_per_target=True).fit((x_tr - mu) / sd, y[tr])
        cols = ds.group_index(name)
        full = np.zeros((len(va), ds.group.n_vertices), np.float32)
        p, t, o = full.copy(), full.copy(), np.zeros(full.shape, bool)
        p[:, cols], t[:, cols], o[:, cols] = model.predict((x_va - mu) / sd), y[va], True
        preds.append(p), targets.append(t), observed.append(o)
        scores.append(score_subject(s, model.predict((x_te - mu) / sd).astype(np.float32), "test")["score"])
    r2 = pooled_r2(np.concatenate(preds), np.concatenate(targets), np.concatenate(observed))
    return {"val": float(np.nanmedian(r2)), "test": float(np.mean(scores)), "seconds": time.perf_counter() - t0}


def test_score(run: Path, data: Path, out: Path) -> float:
    from blobenc.predictions import predict

    scores = predict(run, data, out, progress=False)
    return float(np.mean([s["score"] for s in scores.values()]))


def defaults(work: Path, args) -> None:
    """Default fit-head against the ridge baselines at several data sizes: devkit test score (mean
    over subjects), validation median R², wall time, steps to the best epoch."""
    import json

    rows = []
    for i, n in enumerate(args.sizes):
        data, cache = small_dataset(work, n, args.data_seed + i)
        out = work / f"n{n}-seed{args.data_seed + i}" / "head"
        if not (out / "summary.json").exists():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            fit_head(cache, data, out, [HeadConfig(device=args.device)], progress=False)
            (out / "wall.txt").write_text(f"{time.perf_counter() - t0}")
        summary = json.loads((out / "summary.json").read_text())
        run = json.loads((out / "run.json").read_text())
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        head = test_score(out, data, out.parent / "pred-head")
        ridge = pooled_ridge(data, cache, AlgonautsDataset(data).validation_split(0.1, 0))
        cfg, wall = run["resolved"][0], float((out / "wall.txt").read_text())
        rows += [
            (f"[bold]{n} images/subject: {run['train_samples']} training samples", ""),
            (
                "fit-head defaults: batch, epochs, steps, P, hidden, init",
                f"{cfg['batch_size']}, {cfg['epochs']}, {lines[-1]['step']}, {cfg['proj_dim']}, "
                f"{cfg['hidden_dim']}, {cfg['init']}",
            ),
            ("fit-head: best epoch (step)", f"{summary['best_epoch']} ({lines[summary['best_epoch']]['step']})"),
            ("fit-head: wall time (s)", f"{wall:.0f}"),
            ("ridge stand-in: wall time (s)", f"{ridge['seconds']:.0f}"),
            ("validation median R²: fit-head / ridge", f"{summary['val']['median_r2']:.4f} / {ridge['val']:.4f}"),
            (
                "[bold]test score (devkit, mean over subjects): fit-head / ridge",
                f"[bold]{head:.2f} / {ridge['test']:.2f}",
            ),
        ]
    report(
        f"fit-head defaults against ridge: vit_tiny (random init), 8 subjects, {torch.get_num_threads()} threads", rows
    )


def halving(work: Path, args) -> None:
    """8 configs raced with --halving against one trial (the defaults): wall time and steps."""
    import json
    import shutil

    from blobenc.train.config import load_config

    data, cache = small_dataset(work, args.sizes[0], args.data_seed)
    base = load_config(None, [f"device={args.device}"])
    grid = sweep_configs(base, ["lr=3e-4,1e-3", "dropout=0.25,0.5", "weight_decay=0.1,0.8"])
    times = {}
    for name, configs, kw in (("one trial", [base], {}), ("8 configs, --halving", grid, {"halving": 2})):
        out = work / f"halving-{len(configs)}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        summary = fit_head(cache, data, out, configs, progress=False, **kw)
        times[name] = (time.perf_counter() - t0, sum(r["steps"] for r in summary["trials"]), summary)
    one, eight = times["one trial"], times["8 configs, --halving"]
    stopped = [r["dir"] + ": " + (r["stopped"] or "survivor") for r in eight[2]["trials"]]
    rows = [
        ("one trial: wall time (s), optimizer steps", f"{one[0]:.0f}, {one[1]}"),
        ("8 configs with --halving: wall time (s), optimizer steps", f"{eight[0]:.0f}, {eight[1]}"),
        ("[bold]ratio 8 halved / 1 (wall; steps)", f"[bold]{eight[0] / one[0]:.2f}; {eight[1] / one[1]:.2f}"),
        (
            "best of the 8 (val median R²) / the one",
            f"{eight[2]['val']['median_r2']:.4f} / {one[2]['val']['median_r2']:.4f}",
        ),
        ("trials", json.dumps(stopped)),
    ]
    report(f"fit-head --halving: {args.sizes[0]} images/subject", rows)


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
    p.add_argument("--ckpt-epochs", type=int, default=10, help="epochs of the checkpoint-bytes runs")
    p.add_argument("--sizes", type=int, nargs="+", default=[120, 480], help="defaults: training images per subject")
    p.add_argument("--data-seed", type=int, default=11, help="defaults/halving: seed of the first synthetic dataset")
    sections = ["speed", "checkpoints", "defaults", "halving"]
    p.add_argument("--sections", nargs="+", default=sections, choices=sections, help="what to run")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="blobenc-bench-head-"))
    if "defaults" in args.sections:
        defaults(work / "defaults", args)
    if "halving" in args.sections:
        halving(work / "defaults", args)
    if "checkpoints" in args.sections:
        rows = checkpoint_bytes(work / "checkpoints", args, device)
        report(f"fit-head checkpoints: hidden {args.hidden_dim}, P {args.proj_dim}, {args.model} pooled", rows)
    if "speed" in args.sections:
        speed(work, args)


def speed(work: Path, args) -> None:
    """Head steps from the cache against the trunk every batch, and a one-pass sweep against one trial."""
    synth = SynthConfig(subjects=2, train_images=args.train_images, test_images=8, vertices="full")
    work, data_root = synthetic_workdir(work, "blobenc-bench-head-", synth)
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
