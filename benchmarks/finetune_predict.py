"""Finetune and predict benchmark: one run, one table (docs/benchmarks.md records the figures).

    python benchmarks/finetune_predict.py [--model vit_tiny_patch16_224] [--grad-checkpointing] [--device auto]

Measures: finetune training samples/s (attention blocks + head, augmentation, DataLoader) with peak
GPU memory when on CUDA; predict images/s from cached features against running the trunk.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _report import report, synthetic_workdir

from blobenc.data.algonauts import AlgonautsDataset
from blobenc.data.synth import SynthConfig
from blobenc.features.extract import ExtractConfig, extract
from blobenc.features.trunk import TrunkSpec
from blobenc.predictions import predict
from blobenc.train.config import FinetuneConfig, HeadConfig
from blobenc.train.finetune import finetune
from blobenc.train.fit import fit_head


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--layers", nargs="+", default=["blocks.[0369]", "blocks.11"])
    p.add_argument("--train-images", type=int, default=96, help="per subject (2 subjects)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args(argv)

    synth = SynthConfig(subjects=2, train_images=args.train_images, test_images=32)
    work, data = synthetic_workdir(args.workdir, "blobenc-bench-ft-", synth)
    index = AlgonautsDataset(data).unique_images()
    trunk = TrunkSpec(args.model, pretrained=False)
    extract(
        index.keys,
        list(index.paths),
        work / "cache",
        ExtractConfig(trunk=trunk, layers=tuple(args.layers), device=args.device),
        progress=False,
    )
    head = HeadConfig(epochs=2, batch_size=args.batch_size, hidden_dim=256, proj_dim=64, device=args.device)
    fit_head(work / "cache", data, work / "run", [head], progress=False)

    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = FinetuneConfig(
        epochs=1, batch_size=args.batch_size, lr=1e-5, grad_checkpointing=args.grad_checkpointing, device=args.device
    )
    summary = finetune(work / "run", data, work / "ft", cfg, resume=False, progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")

    n_test = sum(len(s.images["test"]) for s in AlgonautsDataset(data).subjects.values())
    rates = {}
    for name, use_cache in (("cached", True), ("trunk", False)):
        t0 = time.perf_counter()
        predict(work / "run", data, work / f"pred-{name}", use_cache=use_cache, device=args.device, progress=False)
        rates[name] = n_test / (time.perf_counter() - t0)

    title = (
        f"finetune / predict: {args.model}, batch {args.batch_size}, "
        f"{'cuda' if cuda else 'cpu'}, grad checkpointing {args.grad_checkpointing}"
    )
    rows = [
        ("finetune samples/s (1 epoch, incl. validation)", f"{summary['samples_per_s']:.1f}"),
        ("trainable parameters", f"{summary['trainable_parameters']:,}"),
        ("peak GPU memory (GiB)", f"{peak:.2f}"),
        ("predict from cached features (images/s)", f"{rates['cached']:.1f}"),
        ("predict running the trunk (images/s)", f"{rates['trunk']:.1f}"),
        ("[bold]ratio cached / trunk", f"[bold]{rates['cached'] / rates['trunk']:.1f}x"),
    ]
    report(title, rows)


if __name__ == "__main__":
    main()
