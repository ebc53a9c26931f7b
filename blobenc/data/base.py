"""The dataset protocol every layout implements, and what the layouts share (docs/data.md).

A dataset is a set of subjects. Each subject has rows (presentations) per split; a row names an
image by its *key* (an image may appear in many rows and subjects, and is cached once) and has one
response per *target* (vertex, voxel, neuron). Each subject's targets are indices into a common
space; the *group space* is the sorted union of the subjects' indices, the space the group PCA and
the multi-subject head predict in. Targets a subject lacks are missing for it, never zero.

Two layouts implement it: the Algonauts 2023 challenge folders (`blobenc.data.algonauts`) and the
generic layout (`blobenc.data.generic`); `blobenc.data.open_dataset` tells them apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from blobenc.errors import DataError, PredictionError
from blobenc.files import atomic_path

SPLITS = ("train", "test")
HEMIS = ("lh", "rh")
FSAVERAGE = "fsaverage"
FSAVERAGE_SIZE = 2 * 163842  # lh vertices 0..163841, rh vertices after them
WHOLE = "all"  # the one part of a target space without hemispheres


@dataclass(frozen=True, eq=False)
class GroupSpace:
    """The common target space a group model predicts in.

    `index` holds the sorted target ids (into a space of `size` ids) that at least one subject
    has; a subject maps into it through its own target ids. With `surface="fsaverage"` an id is an
    fsaverage vertex, the left hemisphere first (0..size/2-1) and the right after it: the
    Algonauts convention (163842 vertices per hemisphere), which lets maps be drawn.
    """

    index: np.ndarray  # (n_targets,) sorted unique int64 ids
    size: int
    surface: str | None = None

    @property
    def n_targets(self) -> int:
        return len(self.index)

    @property
    def n_vertices(self) -> int:
        """The same as `n_targets` (fMRI wording)."""
        return len(self.index)

    @classmethod
    def from_hemispheres(cls, index: dict[str, np.ndarray], size: dict[str, int]) -> GroupSpace:
        """An fsaverage space from per-hemisphere vertex indices and hemisphere sizes."""
        if size["lh"] != size["rh"]:
            raise DataError(f"fsaverage hemispheres of different sizes: lh {size['lh']}, rh {size['rh']}")
        ids = np.concatenate([np.asarray(index["lh"], np.int64), np.asarray(index["rh"], np.int64) + size["lh"]])
        return cls(ids, 2 * int(size["lh"]), FSAVERAGE)

    @property
    def hemi_size(self) -> int:
        if self.surface != FSAVERAGE:
            raise DataError("this target space has no hemispheres (it is not an fsaverage surface)")
        return self.size // 2

    @property
    def fsaverage_index(self) -> dict[str, np.ndarray]:
        """hemi -> sorted vertex indices within that hemisphere (fsaverage spaces only)."""
        h = self.hemi_size
        return {"lh": self.index[self.index < h], "rh": self.index[self.index >= h] - h}

    @property
    def fsaverage_size(self) -> dict[str, int]:
        return {"lh": self.hemi_size, "rh": self.hemi_size}

    def parts(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        """Which of these target ids fall in each part of the space: {lh, rh} on an fsaverage
        surface, else the whole space as one part ("all"). Bool masks over `targets`."""
        targets = np.asarray(targets)
        if self.surface == FSAVERAGE:
            lh = targets < self.hemi_size
            return {"lh": lh, "rh": ~lh}
        return {WHOLE: np.ones(len(targets), dtype=bool)}

    def positions(self, targets: np.ndarray, what: str = "targets") -> np.ndarray:
        """Group index of each target id; an id outside the group space is an error."""
        targets = np.asarray(targets, dtype=np.int64)
        pos = np.searchsorted(self.index, targets)
        inside = pos < len(self.index)
        inside[inside] = self.index[pos[inside]] == targets[inside]
        if not inside.all():
            raise DataError(f"{what}: target {int(targets[~inside][0])} is outside the group space")
        return pos

    def to_dict(self) -> dict:
        return {"size": int(self.size), "surface": self.surface, "index": self.index.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> GroupSpace:
        """From `to_dict`, or from the per-hemisphere form runs written before it (lh/rh keys)."""
        if "index" in d:
            return cls(np.asarray(d["index"], dtype=np.int64), int(d["size"]), d.get("surface"))
        return cls.from_hemispheres(
            {h: np.asarray(d[h]["fsaverage_index"]) for h in HEMIS}, {h: int(d[h]["fsaverage_size"]) for h in HEMIS}
        )

    def same_as(self, other: GroupSpace) -> bool:
        return (
            self.size == other.size
            and self.surface == other.surface
            and len(self.index) == len(other.index)
            and np.array_equal(self.index, other.index)
        )


@dataclass(frozen=True)
class ImageIndex:
    """Every unique image of a dataset once, in ascending key order: what a feature cache holds."""

    keys: list[str]
    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.keys)


def nsd_key(nsd_id: int) -> str:
    """The image key of an NSD image (Algonauts layout): what the feature cache's rows are keyed by."""
    return f"nsd-{nsd_id:05d}"


@dataclass(frozen=True)
class ValidationSplit:
    """Image keys held out for validation, for every subject at once."""

    seed: int
    fraction: float
    val_keys: np.ndarray  # sorted str keys

    def rows(self, subject: Subject, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(train_rows, val_rows) of a subject's `split` rows."""
        is_val = np.isin(np.asarray(subject.keys[split], dtype=str), self.val_keys)
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)

    def save(self, path: Path) -> None:
        d = {"seed": self.seed, "fraction": self.fraction, "val_keys": self.val_keys.tolist()}
        path.write_text(json.dumps(d))

    @classmethod
    def load(cls, path: Path) -> ValidationSplit:
        try:
            d = json.loads(path.read_text())
            if "val_keys" in d:
                keys = [str(k) for k in d["val_keys"]]
            else:  # written before image keys: NSD ids of an Algonauts dataset
                keys = [nsd_key(int(i)) for i in d["val_ids"]]
            return cls(int(d["seed"]), float(d["fraction"]), np.asarray(sorted(keys), dtype=str))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a validation split file ({e})") from None


@runtime_checkable
class Subject(Protocol):
    """One subject of any layout."""

    name: str
    path: Path
    images: dict[str, tuple[Path, ...]]  # split -> image file of each row
    keys: dict[str, tuple[str, ...]]  # split -> image key of each row (rows may repeat an image)

    @property
    def targets(self) -> np.ndarray:
        """(n_targets,) int64: each target's id in the common space, in the subject's own order."""

    @property
    def n_targets(self) -> int: ...

    @property
    def parts(self) -> dict[str, np.ndarray]:
        """Part name -> bool mask over the subject's targets (lh/rh on a surface, else "all")."""

    def has_responses(self, split: str) -> bool: ...

    def responses(self, split: str, rows: np.ndarray | None = None) -> np.ndarray:
        """(n_rows, n_targets) float32 in RAM: every row of `split`, or only `rows`, read lazily."""

    def weights(self, split: str) -> np.ndarray | None:
        """(n_rows,) float row weights, or None when the layout gives none."""

    def noise_ceiling(self) -> np.ndarray | None:
        """(n_targets,) float64 fraction in [0, 1], or None when none is shipped."""

    def rois(self) -> dict[str, tuple[np.ndarray, dict[int, str]]]:
        """ROI group -> (int label per target, {label: name}); label 0 is no ROI."""


@runtime_checkable
class Dataset(Protocol):
    """Any image -> response dataset blobenc trains on, predicts and scores."""

    root: Path
    name: str
    layout: str
    subjects: dict[str, Subject]

    @property
    def group(self) -> GroupSpace: ...

    def group_index(self, subject: str) -> np.ndarray: ...

    def unique_images(self, splits: tuple[str, ...] = SPLITS) -> ImageIndex: ...

    def validation_split(self, fraction: float = 0.1, seed: int = 0) -> ValidationSplit: ...

    def write_predictions(
        self, out: Path, subject: str, pred: np.ndarray, split: str = "test", keys: Sequence[str] | None = None
    ) -> list[Path]: ...

    def read_predictions(self, out: Path, subject: str, split: str = "test") -> np.ndarray: ...

    def prediction_subjects(self, out: Path) -> list[str]: ...


class DatasetBase:
    """What every layout shares, given `root`, `subjects` and the common space (`space_size`,
    `surface`): the group space, unique images, the validation split, prediction folders."""

    root: Path
    name: str
    layout: str
    subjects: dict
    space_size: int
    surface: str | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, subjects={list(self.subjects)})"

    @cached_property
    def group(self) -> GroupSpace:
        """The sorted union of the subjects' target ids."""
        index = np.unique(np.concatenate([s.targets for s in self.subjects.values()]))
        return GroupSpace(index.astype(np.int64), int(self.space_size), self.surface)

    def group_index(self, subject: str) -> np.ndarray:
        """Group-space index of each of a subject's targets (its own order)."""
        s = self.subjects[subject]
        return self.group.positions(s.targets, str(s.path))

    def unique_images(self, splits: tuple[str, ...] = SPLITS) -> ImageIndex:
        """Every image key of every subject and split once (ascending key, first file found)."""
        first: dict[str, Path] = {}
        for subject in self.subjects.values():
            for split in splits:
                for key, path in zip(subject.keys.get(split, ()), subject.images.get(split, ()), strict=True):
                    first.setdefault(key, path)
        keys = sorted(first)
        return ImageIndex(keys, tuple(first[k] for k in keys))

    def validation_split(self, fraction: float = 0.1, seed: int = 0) -> ValidationSplit:
        """Hold out a `fraction` of the unique training images, across all subjects at once."""
        if not 0 < fraction < 1:
            raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
        keys = np.asarray(self.unique_images(("train",)).keys, dtype=str)
        n_val = max(1, round(fraction * len(keys)))
        rng = np.random.default_rng(seed)
        return ValidationSplit(seed, fraction, np.sort(rng.choice(keys, size=n_val, replace=False)))

    prediction_example = "<subject>/pred_test.npy"

    def _is_subject_folder(self, name: str) -> bool:
        return not name.startswith(".")

    def prediction_subjects(self, out: Path) -> list[str]:
        """The subject folders of a prediction folder, each checked to be a subject of this dataset."""
        out = Path(out)
        if not out.is_dir():
            raise PredictionError(f"{out}: prediction folder not found")
        names = sorted(p.name for p in out.iterdir() if p.is_dir() and self._is_subject_folder(p.name))
        unknown = [n for n in names if n not in self.subjects]
        if unknown:
            raise PredictionError(f"{out / unknown[0]}: subject not in the data ({', '.join(self.subjects)})")
        if not names:
            raise PredictionError(f"{out}: no subject folders (expected {self.prediction_example}, ...)")
        return names


def dataset_id(dataset: Dataset) -> str:
    """A short digest of what a model trained on `dataset` depends on: its subjects, their target
    ids and the image key of every row of every split. Equal for a copy of the dataset in another
    folder; different when an image, a subject or a target changes."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(dataset.subjects):
        subject = dataset.subjects[name]
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(subject.targets, dtype=np.int64).tobytes())
        for split in SPLITS:
            h.update(split.encode() + b"\0" + "\0".join(subject.keys.get(split, ())).encode() + b"\1")
    return h.hexdigest()[:16]


def group_regions(dataset: Dataset) -> tuple[np.ndarray, list[str]]:
    """Each group target's region, one region per ROI and part (hemisphere), from the subjects' ROI
    labels: (label (n_targets,) in [-1, R), the R region names, e.g. "lh.FFA-1"). A subject's target
    takes the first of the layout's ROI groups that labels it (Algonauts: prf-visualrois, then the
    floc groups, then streams: the finest first); a group target, the region most of the subjects
    that have it give it (ties: the first region found); -1 where none labels it."""
    names: dict[str, int] = {}
    found = []  # (group columns, region) of each subject's labelled targets
    for name, subject in dataset.subjects.items():
        parts = subject.parts
        region = np.full(subject.n_targets, -1, np.int64)
        for labels, roi_names in subject.rois().values():
            for part, mask in parts.items():
                free = mask & (labels > 0) & (region < 0)
                for label in np.unique(labels[free]).tolist():
                    roi = roi_names.get(label, str(label))
                    key = f"{part}.{roi}" if len(parts) > 1 else roi
                    region[free & (labels == label)] = names.setdefault(key, len(names))
        labelled = region >= 0
        found.append((dataset.group_index(name)[labelled], region[labelled]))
    if not names:
        return np.full(len(dataset.group.index), -1, np.int64), []
    votes = np.zeros((len(dataset.group.index), len(names)), np.int32)
    for columns, region in found:
        np.add.at(votes, (columns, region), 1)
    labels = np.where(votes.any(1), votes.argmax(1), -1)
    used = np.unique(labels[labels >= 0])  # regions that no group target ended in are dropped
    renumber = np.full(len(names), -1, np.int64)
    renumber[used] = np.arange(len(used))
    order = list(names)
    return np.where(labels >= 0, renumber[np.maximum(labels, 0)], -1), [order[k] for k in used]


def write_array(path: Path, arr: np.ndarray) -> None:
    """np.save through a temporary name and a rename: a reader never sees half a file."""
    with atomic_path(path) as tmp, tmp.open("wb") as f:  # np.save on a path would append .npy to tmp's name
        np.save(f, arr)


def read_prediction_file(path: Path, shape: tuple[int, int], what: str) -> np.ndarray:
    """A prediction .npy checked for shape, dtype float32 and finite values."""
    if not path.is_file():
        raise PredictionError(f"{path}: prediction file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise PredictionError(f"{path}: not a readable .npy array ({e})") from None
    if arr.shape != shape:
        raise PredictionError(f"{path}: expected shape {shape} ({what}), found {arr.shape}")
    if arr.dtype != np.float32:
        raise PredictionError(f"{path}: expected dtype float32, found {arr.dtype}")
    if not np.isfinite(arr).all():
        raise PredictionError(f"{path}: holds NaN or inf values; every prediction must be finite")
    return arr


def describe_dataset(ds: Dataset) -> dict:
    """What `blobenc info ROOT --json` says of a dataset: layout, group space, per-subject counts."""
    return {
        "path": str(ds.root),
        "layout": ds.layout,
        "name": ds.name,
        "group": {"targets": ds.group.n_targets, "size": ds.group.size, "surface": ds.group.surface},
        "unique_images": len(ds.unique_images()),
        "subjects": {
            name: {
                "train_rows": len(s.keys["train"]),
                "train_images": len(set(s.keys["train"])),
                "test_rows": len(s.keys.get("test", ())),
                "test_responses": s.has_responses("test"),
                "targets": s.n_targets,
                "noise_ceiling": s.noise_ceiling() is not None,
                "rois": list(s.rois()),
            }
            for name, s in ds.subjects.items()
        },
    }


def verify_images(paths: Sequence[Path], workers: int = 8) -> None:
    """Open every image's header (no decoding): a missing or unreadable file is one DataError
    naming it, raised before any work that would stop halfway on it."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, UnidentifiedImageError

    def check(path: Path) -> str:
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018 - the header is parsed here
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            return f"{path}: cannot read image ({e})"
        return ""

    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for err in pool.map(check, unique):
            if err:
                raise DataError(err)


def pick_subjects(folder: Path, found: list[str], wanted: Sequence[str] | None) -> list[str]:
    """The subject folders `found`, narrowed to `wanted` when given (each must be there)."""
    if not wanted:
        return found
    missing = [s for s in wanted if s not in found]
    if missing:
        raise DataError(f"{folder}: subject folder {missing[0]} not found; found {', '.join(found)}")
    return [s for s in found if s in wanted]
