"""`extract`, `layers` and `info`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from blobenc.cli._common import (
    DeviceOpt,
    JsonOpt,
    LayersOpt,
    MaxMemoryOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    ProfileOpt,
    QuietOpt,
    SeedOpt,
    WeightsOpt,
    computing,
    console,
    err_console,
    errors,
    setup_logging,
)
from blobenc.data import open_dataset
from blobenc.data.base import describe_dataset
from blobenc.defaults import DEFAULT_MODEL
from blobenc.files import write_json

# torch, timm and zarr are imported inside the commands: `blobenc --help` and completion stay fast.


def extract_command(
    data: Annotated[
        Path | None, typer.Argument(help="Dataset root (Algonauts or generic layout); every unique image once.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="The feature cache to write (a Zarr v3 group).")] = Path("cache"),
    images: Annotated[Path | None, typer.Option("--images", help="Any folder of images, instead of DATA.")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    layers: LayersOpt = None,
    pretrained: PretrainedOpt = True,
    weights: WeightsOpt = None,
    seed: SeedOpt = 0,
    store_dtype: Annotated[str, typer.Option(help="float16 (half the bytes) or float32.")] = "float16",
    pool: Annotated[int | None, typer.Option(help="Average-pool patch tokens to an N x N grid.")] = None,
    views: Annotated[int, typer.Option(help="Views per image: centre crop + K-1 random resized crops.")] = 1,
    crop_scale: Annotated[float, typer.Option(help="Smallest crop area fraction of the random views.")] = 0.8,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(help="DataLoader worker processes (default: on CPU 1 per 4 cores, on GPU cores - 1; at most 8)."),
    ] = None,
    chunk_images: Annotated[int | None, typer.Option(help="Images per chunk (default: ~16 MiB chunks).")] = None,
    shard: Annotated[str | None, typer.Option(help="I/N: fill only shard I of N (torchrun: from RANK).")] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing cache: the new one is built beside it and swapped in when whole.")
    ] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    json_out: JsonOpt = None,
    profile: ProfileOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run a timm trunk once over every image and cache several layers' activations (resumable)."""
    from blobenc import api

    setup_logging(quiet)
    with errors(out), computing(profile, lambda: out, quiet):
        summary = api.extract(
            data, out, images=images, model=model, layers=layers, pretrained=pretrained, weights=weights,
            seed=seed, store_dtype=store_dtype, pool=pool, views=views, crop_scale=crop_scale,
            batch_size=batch_size, workers=workers, chunk_images=chunk_images, shard=shard, overwrite=overwrite,
            device=device, precision=precision, max_memory=max_memory, progress=not quiet,
        )  # fmt: skip
    info = summary.pop("info")
    if json_out is not None:
        write_json(json_out, summary | {"info": info})
    if not quiet:
        console.print(info_table(info, summary))


def info_table(info: dict, summary: dict | None = None) -> Table:
    table = Table(title=f"feature cache {info['path']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    trunk = info["trunk"]
    source = trunk["weights"] or ("pretrained" if trunk["pretrained"] else f"random init, seed {trunk['seed']}")
    rows = [
        ("trunk", f"{trunk['model']} ({source})"),
        ("weights fingerprint", info["weights_fingerprint"]),
        ("input", f"{info['preprocessing']['input_size']} {info['preprocessing']['interpolation']}"),
        ("dtype / pool / views", f"{info['dtype']} / {info['pool'] or '-'} / {info['views']}"),
        ("images", str(info["images"])),
        ("chunks", f"{info['chunks_done']}/{info['chunks_total']} complete ({info['chunk_images']} images each)"),
        ("bytes per image", f"{info['bytes_per_image'] / 1e6:.3f} MB"),
        ("on disk", f"{info['bytes_on_disk'] / 1e6:.1f} MB (compression ratio {info['compression_ratio']:.2f})"),
    ]
    rows += [(f"layer {name}", " x ".join(map(str, d["shape"]))) for name, d in info["layers"].items()]
    if summary and summary["images_done"]:
        rows.append(
            (
                "this run",
                f"{summary['images_done']} images in {summary['seconds']:.1f} s "
                f"({summary['images_per_s']:.1f} img/s, {summary['mb_written']:.1f} MB written)",
            )
        )
    for k, v in rows:
        table.add_row(k, v)
    return table


def info_command(
    cache: Annotated[Path, typer.Argument(help="A feature cache, or a dataset root (either layout).")],
    json_out: JsonOpt = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Read every chunk and check its checksum; name the damaged ones.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Show what a feature cache holds (trunk, layers, shapes, progress, bytes on disk), or a
    dataset's subjects, rows, targets, ceilings and ROIs (any layout, checked as it opens).
    With --verify, exit 1 when a chunk or array of the cache is damaged."""
    from blobenc.features.cache import FeatureCache, is_cache

    with errors():
        if not is_cache(cache) and _looks_like_dataset(cache):
            from blobenc.cli.data import dataset_table

            ds = open_dataset(cache)
            if json_out is not None:
                write_json(json_out, describe_dataset(ds))
            if not quiet:
                console.print(dataset_table(ds, f"{ds.layout} dataset {ds.root} ({ds.name})"))
            return
        opened = FeatureCache.open(cache, allow_incomplete=True, check_arrays=not verify)
        damaged = opened.verify(progress=not quiet) if verify else None
        info = opened.info()
        if damaged is not None:
            info["damaged"] = damaged
    if json_out is not None:
        write_json(json_out, info)
    if not quiet:
        console.print(info_table(info))
    if damaged:
        missing = opened.missing_arrays()
        where = "; ".join(
            f"layer {layer!r}: " + ("array missing" if layer in missing else f"chunk(s) {', '.join(map(str, cs))}")
            for layer, cs in damaged.items()
        )
        err_console.print(
            f"[bold red]error:[/] {cache}: damaged: {where}; rerun the same `blobenc extract` to recompute them",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    if damaged is not None and not quiet:
        console.print(f"{cache}: every finished chunk verified (files and checksums)")


def _looks_like_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset.yaml").is_file() or any(p.is_dir() and p.name.startswith("subj") for p in path.iterdir())
    )


def layers_command(
    model: Annotated[str, typer.Argument(help="Any timm model name.")],
    filter_: Annotated[str | None, typer.Option("--filter", help="Glob over module names.")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained")] = False,
) -> None:
    """List a model's module names with their output shapes, to choose --layers."""
    from blobenc.features.trunk import TrunkSpec, all_layer_shapes, create_trunk, preprocessing

    with errors():
        trunk = create_trunk(TrunkSpec(model, pretrained))
        rows = all_layer_shapes(trunk, preprocessing(trunk), filter_)
    table = Table(title=f"{model}: modules and output shapes (batch dimension left out)")
    table.add_column("module")
    table.add_column("output shape", justify="right")
    for name, shape in rows:
        table.add_row(name, " x ".join(map(str, shape)) if shape else "-")
    console.print(table)
