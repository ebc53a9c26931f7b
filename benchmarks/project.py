"""Project a `scale.py` run to the seed's trunk: the same phases, scaled by what this machine
measures of both trunks (random init, fp32, no downloads).

    python benchmarks/project.py --scale /tmp/scale/n9841/scale.json \\
        [--measured test_vit --target eva02_base_patch14_224 --layers 6 --image-px 425]

Measured here, for the trunk the scale run used and for the target: FLOPs per image
(torch.utils.flop_counter), forward images/s (batch 16, fp32), and the bytes per image of the
first `--layers` blocks' outputs in float16 (the cache); and the seconds to decode one
`--image-px` PNG and resize it to each trunk's input (the NSD's 425-px stimuli; the scale run's
synthetic images are 64 px). Projected, per command, from the scale run's phases:

- extract: the images over the target's measured forward images/s, decoding from the PNG
  timing, bytes written from the bytes per image;
- fit-head: a training step's seconds x the ratio of its FLOPs per sample (the layers'
  factorized projections scale with tokens x channels; the subject maps and the loss through the
  embedding do not), per epoch, and the features read per epoch from disk at `--disk-gbps` when they exceed the RAM
  (they are streamed: fit-head's plan does so beyond --max-memory); the group PCA as measured
  (it sees responses only);
- fit-ridge: the solve x the ratio of pooled feature dimensions (its cost is linear in them at
  these sizes: n x d x V products dominate d^3).

What this leaves out is said in docs/benchmarks.md next to the table.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import timm
import torch
from _report import report
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode


def trunk_facts(name: str, layers: int) -> dict:
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(1, *size)
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.shape)) for b in model.blocks[:layers]]
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        model.forward_features(x)
    for h in hooks:
        h.remove()
    tokens, channels = outputs[0][1], outputs[0][2]
    batch = torch.randn(16, *size)
    with torch.no_grad():
        model.forward_features(batch[:2])  # warm-up
        start = time.perf_counter()
        for _ in range(2):
            model.forward_features(batch)
        per_s = 32 / (time.perf_counter() - start)
    return {
        "input_px": size[-1],
        "gflops_per_image": flops.get_total_flops() / 1e9,
        "images_per_s": per_s,
        "tokens": tokens,
        "channels": channels,
        "cache_bytes_per_image": sum(2 * s[1] * s[2] for s in outputs),
        "layers": len(outputs),
    }


def decode_seconds(px: int, to_px: int, n: int = 20) -> float:
    """One PNG of `px` pixels (smooth noise: closer to a photograph's size than white noise)
    decoded and resized to `to_px`."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (px // 8, px // 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((px, px), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    start = time.perf_counter()
    for _ in range(n):
        Image.open(io.BytesIO(data)).convert("RGB").resize((to_px, to_px), Image.BICUBIC)
    return (time.perf_counter() - start) / n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=Path, required=True, help="scale.json written by benchmarks/scale.py")
    p.add_argument("--measured", default="test_vit")
    p.add_argument("--target", default="eva02_base_patch14_224")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--image-px", type=int, default=425)
    p.add_argument(
        "--images", type=int, default=None, help="unique images (default: the scale run's cache; NSD: ~73,000)"
    )
    p.add_argument("--epochs", type=int, default=40, help="fit-head's full schedule at this size")
    p.add_argument("--ram-gb", type=float, default=24.0)
    p.add_argument("--disk-gbps", type=float, default=0.55, help="sequential read rate of the cache's disk")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    runs = json.loads(args.scale.read_text())
    run = runs["this checkout"]
    a, b = trunk_facts(args.measured, args.layers), trunk_facts(args.target, args.layers)
    dec_a, dec_b = decode_seconds(64, a["input_px"]), decode_seconds(args.image_px, b["input_px"])
    if args.images is None:
        from blobenc.features.cache import FeatureCache

        args.images = len(FeatureCache.open(args.scale.parent / "this" / "cache").keys)
    n_images = args.images
    rows = [
        ("trunks", f"{args.measured} -> {args.target}, {args.layers} blocks cached"),
        ("GFLOPs per image", f"{a['gflops_per_image']:.3f} -> {b['gflops_per_image']:.1f}"),
        ("forward images/s (fp32, batch 16, this CPU)", f"{a['images_per_s']:.0f} -> {b['images_per_s']:.2f}"),
        ("tokens x channels per layer", f"{a['tokens']} x {a['channels']} -> {b['tokens']} x {b['channels']}"),
        ("cache per image (float16)", f"{a['cache_bytes_per_image'] / 1e3:.1f} kB -> {b['cache_bytes_per_image'] / 1e6:.2f} MB"),  # noqa: E501
        ("decode + resize one image", f"64 px {dec_a * 1e3:.2f} ms -> {args.image_px} px {dec_b * 1e3:.2f} ms"),
        ("unique images", str(n_images)),
    ]  # fmt: skip
    cache_gb = n_images * b["cache_bytes_per_image"] / 1e9
    ex = run.get("extract")
    if ex:
        fwd, dec = n_images / b["images_per_s"], n_images * dec_b
        rows.append(
            (
                "extract, measured: forward / decoding",
                f"{ex['phases'].get('forward', 0):.0f} s / {ex['phases'].get('read images', 0):.0f} s",
            )
        )
        rows.append(
            ("extract: forward / decoding / written", f"{fwd / 3600:.1f} h / {dec / 60:.0f} min / {cache_gb:.0f} GB")
        )
    head = run.get("fit-head")
    if head:
        ph = head["phases"]
        run_json = args.scale.parent / "this" / "head" / "run.json"
        cfg = json.loads(run_json.read_text())["resolved"][0]
        epochs_run, k, p_dim = cfg["epochs"], cfg["hidden_dim"], cfg["proj_dim"]
        # a step's FLOPs per sample: the factorized projection of every layer (what the trunk
        # changes), the shared and subject maps and the loss through the embedding (what it does not)
        rest = 2 * 2 * k * p_dim + 2 * p_dim * p_dim
        ratio = (args.layers * 2 * b["tokens"] * b["channels"] * k + rest) / (
            args.layers * 2 * a["tokens"] * a["channels"] * k + rest
        )
        rows.append(
            (
                "fit-head: measured steps per epoch; FLOP ratio of a step",
                f"{(ph.get('forward', 0) + ph.get('backward', 0)) / epochs_run:.0f} s; {ratio:.1f}x",
            )
        )
        steps = (ph.get("forward", 0) + ph.get("backward", 0)) / epochs_run * ratio
        stream = cache_gb / args.disk_gbps if cache_gb > args.ram_gb else 0.0
        per_epoch = max(steps, stream)  # the prefetching reader overlaps reading with the steps
        rows.append(
            (
                "fit-head: steps per epoch / cache read per epoch / full schedule",
                f"{steps / 60:.0f} min / {stream / 60:.1f} min / {args.epochs * per_epoch / 3600:.0f} h "
                f"+ PCA {ph.get('pca', 0) / 60:.0f} min",
            )
        )
    ridge = run.get("fit-ridge")
    if ridge:
        solve = ridge["phases"].get("solve", 0.0) * b["channels"] / a["channels"]
        rows.append(("fit-ridge: solve", f"{solve / 3600:.1f} h"))
    report(f"projection of {args.scale} to {args.target}", rows)


if __name__ == "__main__":
    main()
