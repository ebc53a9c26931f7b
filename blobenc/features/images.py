"""Image files as a torch Dataset: decoding in DataLoader workers, errors reported, not raised."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from blobenc.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(folder: Path) -> tuple[list[str], list[Path]]:
    """Keys (relative paths) and paths of every image below `folder`, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: images folder not found")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [p.relative_to(folder).as_posix() for p in paths], paths


def _open(image) -> Image.Image:
    """An RGB image from a file path or an (H, W, 3) uint8 array."""
    if isinstance(image, str | Path):
        with Image.open(image) as im:
            return im.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {array.dtype} of shape {array.shape}")
    return Image.fromarray(array, "RGB")


class ImageViews(Dataset):
    """Item i: (row, views (V, 3, H, W), error message or ''); `paths` are image files or
    (H, W, 3) uint8 arrays.

    View 0 is `transform` (extract's and predict's eval centre crop, finetune's augmentation),
    drawn with a generator seeded by (*seed, row); views 1..V-1 are `augment`, seeded by (*seed,
    row, view). `seed` is an int or a tuple (finetune's (seed, epoch)): a resumed run draws the
    same crops.
    A file that cannot be decoded yields zeros and its error, so the caller can stop
    cleanly after writing what came before it, instead of a worker traceback.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        rows: Sequence[int],
        transform: Callable,
        input_size: Sequence[int],
        views: int = 1,
        augment: Callable | None = None,
        seed: int | tuple[int, ...] = 0,
    ):
        self.paths, self.rows = list(paths), list(rows)
        self.transform, self.augment = transform, augment
        self.input_size, self.views = tuple(input_size), views
        self.seed = seed if isinstance(seed, tuple) else (seed,)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        path = self.paths[row]
        try:
            img = _open(path)
        except (OSError, SyntaxError, ValueError, TypeError) as e:
            where = path if isinstance(path, str | Path) else f"image {row}"
            return row, torch.zeros(self.views, *self.input_size), f"{where}: cannot read image ({e})"
        out = []
        for v in range(self.views):
            with torch.random.fork_rng(devices=[]):
                key = (*self.seed, row) if v == 0 else (*self.seed, row, v)
                torch.default_generator.manual_seed(hash(key) & 0x7FFF_FFFF)
                out.append(self.transform(img) if v == 0 else self.augment(img))
        return row, torch.stack(out), ""
