"""Datasets: the `Dataset` protocol (base), its Algonauts 2023 and generic layouts, synthetic data;
`open_dataset` tells the layouts apart."""

from collections.abc import Sequence
from pathlib import Path

from blobenc.data.algonauts import AlgonautsDataset
from blobenc.data.base import Dataset, GroupSpace, ImageIndex, Subject, ValidationSplit
from blobenc.data.generic import GENERIC_FORMAT, GenericDataset
from blobenc.errors import DataError

__all__ = ["Dataset", "GroupSpace", "ImageIndex", "Subject", "ValidationSplit", "open_dataset"]


def open_dataset(root: Path | str, subjects: Sequence[str] | None = None) -> Dataset:
    """Open a dataset of either layout: `ROOT/dataset.yaml` with `format: blobenc-generic/1` is
    the generic layout; `ROOT/subjNN/` folders the Algonauts 2023 layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    if subjects is not None and len(set(subjects)) != len(subjects):
        dup = next(s for s in subjects if list(subjects).count(s) > 1)
        raise DataError(f"subject {dup!r} is given twice")
    if (root / "dataset.yaml").is_file():
        return GenericDataset(root, subjects)
    if any(p.is_dir() and p.name.startswith("subj") for p in root.iterdir()):
        return AlgonautsDataset(root, list(subjects) if subjects else None)
    raise DataError(
        f"{root}: neither layout: no dataset.yaml (format: {GENERIC_FORMAT}) and no subjNN folders (Algonauts 2023)"
    )
