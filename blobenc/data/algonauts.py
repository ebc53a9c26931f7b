"""Reader for the Algonauts 2023 challenge layout (see docs/data.md).

Subjects, image counts and vertex counts all come from the files. Each subject's
*native* vertex order is its lh challenge vertices then its rh ones, as in the
fMRI files; the *group* space is the union of all subjects' fsaverage masks in
the same (lh then rh, fsaverage index) order.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from blobenc.data._io import load_array, load_label_mapping
from blobenc.errors import DataError

HEMIS = ("lh", "rh")
ROI_GROUPS = ("prf-visualrois", "floc-bodies", "floc-faces", "floc-places", "floc-words", "streams")
SPLITS = ("train", "test")
_SUBJECT_RE = re.compile(r"^subj(\d\d)$")
_IMAGE_RE = re.compile(r"^(train|test)-(\d+)_nsd-(\d+)\.png$")
_IMAGE_DIRS = {"train": "training_split/training_images", "test": "test_split/test_images"}
_FMRI_FILES = {
    "train": "training_split/training_fmri/{hemi}_training_fmri.npy",
    "test": "test_split/test_fmri/{hemi}_test_fmri.npy",
}


def _scan_images(folder: Path, split: str) -> tuple[tuple[Path, ...], np.ndarray]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found (expected the {split} images)")
    paths, ids = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        m = _IMAGE_RE.match(path.name)
        if m is None or m.group(1) != split:
            raise DataError(f"{path}: unexpected file name; expected '{split}-NNNN_nsd-NNNNN.png'")
        paths.append(path)
        ids.append(int(m.group(3)))
    if not paths:
        raise DataError(f"{folder}: no images found")
    return tuple(paths), np.asarray(ids, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Subject:
    """One subject's files. fMRI arrays are memory-mapped and checked on access."""

    name: str
    path: Path
    images: dict[str, tuple[Path, ...]]  # split -> sorted image paths
    nsd_ids: dict[str, np.ndarray]  # split -> NSD id per image row
    fsaverage_masks: dict[str, np.ndarray]  # hemi -> bool over the fsaverage vertices
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_vertices(self) -> dict[str, int]:
        return {h: int(m.sum()) for h, m in self.fsaverage_masks.items()}

    @property
    def n_vertices_total(self) -> int:
        return sum(self.n_vertices.values())

    def _fmri_path(self, split: str, hemi: str) -> Path:
        return self.path / _FMRI_FILES[split].format(hemi=hemi)

    def has_fmri(self, split: str) -> bool:
        return all(self._fmri_path(split, h).is_file() for h in HEMIS)

    def fmri(self, split: str, hemi: str) -> np.ndarray:
        """(n_images, n_vertices_hemi) float32, memory-mapped; checked for shape and NaN once."""
        key = ("fmri", split, hemi)
        if key not in self._cache:
            path = self._fmri_path(split, hemi)
            arr = load_array(path, shape=(len(self.images[split]), self.n_vertices[hemi]), finite=True)
            self._cache[key] = arr
        return self._cache[key]

    def fmri_native(self, split: str, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, n_vertices_total) float32 in native order (lh then rh), in RAM: every image, or only
        `rows` (read from the memory maps, so a block of rows costs a block of memory)."""
        sel = slice(None) if rows is None else rows
        return np.concatenate([np.asarray(self.fmri(split, h)[sel], dtype=np.float32) for h in HEMIS], axis=1)

    def noise_ceiling(self, hemi: str) -> np.ndarray | None:
        """Noise ceiling per vertex as a fraction in [0, 1], or None when not shipped."""
        path = self.path / f"test_split/noise_ceiling/{hemi}_noise_ceiling.npy"
        if not path.is_file():
            return None
        nc = np.asarray(load_array(path, shape=(self.n_vertices[hemi],), finite=True), dtype=np.float64)
        if nc.min(initial=0) < 0 or nc.max(initial=0) > 1:
            raise DataError(
                f"{path}: expected noise ceilings as fractions in [0, 1], found range [{nc.min():.3g}, {nc.max():.3g}]"
            )
        return nc

    def roi_labels(self, group: str, hemi: str) -> tuple[np.ndarray, dict[int, str]] | None:
        """Integer ROI label per native vertex of `hemi` and the label names, or None if absent."""
        labels_path = self.path / f"roi_masks/{hemi}.{group}_challenge_space.npy"
        mapping_path = self.path / f"roi_masks/mapping_{group}.npy"
        if not labels_path.is_file() or not mapping_path.is_file():
            return None
        labels = np.asarray(load_array(labels_path, shape=(self.n_vertices[hemi],))).astype(np.int64)
        return labels, load_label_mapping(mapping_path)


@dataclass(frozen=True)
class GroupSpace:
    """The union of the subjects' fsaverage masks: the space the group model predicts in."""

    fsaverage_index: dict[str, np.ndarray]  # hemi -> sorted fsaverage vertex indices
    fsaverage_size: dict[str, int]  # hemi -> number of fsaverage vertices

    @property
    def n_vertices(self) -> int:
        return sum(len(v) for v in self.fsaverage_index.values())

    def index_of(self, masks: dict[str, np.ndarray]) -> np.ndarray:
        """Group index of each native vertex (lh then rh) of a subject with these masks."""
        parts, offset = [], 0
        for hemi in HEMIS:
            native = np.flatnonzero(masks[hemi])
            pos = np.searchsorted(self.fsaverage_index[hemi], native)
            if (pos >= len(self.fsaverage_index[hemi])).any() or not np.array_equal(
                self.fsaverage_index[hemi][np.minimum(pos, len(self.fsaverage_index[hemi]) - 1)], native
            ):
                raise DataError(f"{hemi} mask has vertices outside the group space")
            parts.append(pos + offset)
            offset += len(self.fsaverage_index[hemi])
        return np.concatenate(parts)

    def to_dict(self) -> dict:
        return {
            h: {"fsaverage_size": self.fsaverage_size[h], "fsaverage_index": self.fsaverage_index[h].tolist()}
            for h in HEMIS
        }

    def same_as(self, other: GroupSpace) -> bool:
        return all(
            self.fsaverage_size[h] == other.fsaverage_size[h]
            and np.array_equal(self.fsaverage_index[h], other.fsaverage_index[h])
            for h in HEMIS
        )


@dataclass(frozen=True)
class ImageIndex:
    """Every unique image of a dataset once, keyed by NSD id, in ascending id order."""

    nsd_ids: np.ndarray
    paths: tuple[Path, ...]

    @property
    def keys(self) -> list[str]:
        return [f"nsd-{i:05d}" for i in self.nsd_ids]

    def __len__(self) -> int:
        return len(self.nsd_ids)


@dataclass(frozen=True)
class ValidationSplit:
    """NSD ids held out for validation, for every subject at once."""

    seed: int
    fraction: float
    val_ids: np.ndarray

    def rows(self, subject: Subject, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(train_rows, val_rows) of a subject's `split` images."""
        is_val = np.isin(subject.nsd_ids[split], self.val_ids)
        return np.flatnonzero(~is_val), np.flatnonzero(is_val)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"seed": self.seed, "fraction": self.fraction, "val_ids": self.val_ids.tolist()}))

    @classmethod
    def load(cls, path: Path) -> ValidationSplit:
        try:
            d = json.loads(path.read_text())
            return cls(int(d["seed"]), float(d["fraction"]), np.asarray(d["val_ids"], dtype=np.int64))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a validation split file ({e})") from None


class AlgonautsDataset:
    """An Algonauts 2023 challenge folder: `ROOT/subjNN/...`.

    Opening checks the layout (folders, image names, masks, fMRI shapes); array
    contents are checked when first read.
    """

    def __init__(self, root: Path | str, subjects: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and _SUBJECT_RE.match(p.name))
        if not found:
            raise DataError(f"{self.root}: no subject folders (expected subj01, subj02, ...)")
        if subjects:
            missing = [s for s in subjects if s not in found]
            if missing:
                raise DataError(f"{self.root}: subject folder {missing[0]} not found; found {', '.join(found)}")
            found = [s for s in found if s in subjects]
        self.subjects: dict[str, Subject] = {name: self._open_subject(self.root / name) for name in found}

    @staticmethod
    def _open_subject(path: Path) -> Subject:
        images, ids = {}, {}
        for split in SPLITS:
            images[split], ids[split] = _scan_images(path / _IMAGE_DIRS[split], split)
        masks = {}
        for hemi in HEMIS:
            mpath = path / f"roi_masks/{hemi}.all-vertices_fsaverage_space.npy"
            mask = np.asarray(load_array(mpath, ndim=1))
            if not np.isin(mask, (0, 1)).all():
                raise DataError(f"{mpath}: expected a 0/1 mask over fsaverage vertices")
            masks[hemi] = mask.astype(bool)
        subject = Subject(path.name, path, images, ids, masks)
        for split in SPLITS:
            if split == "train" or subject.has_fmri(split):
                for hemi in HEMIS:  # shapes only: headers are cheap, contents are checked on read
                    p = subject._fmri_path(split, hemi)
                    load_array(p, shape=(len(images[split]), subject.n_vertices[hemi]))
        return subject

    def __repr__(self) -> str:
        return f"AlgonautsDataset({str(self.root)!r}, subjects={list(self.subjects)})"

    @cached_property
    def group(self) -> GroupSpace:
        sizes, index = {}, {}
        for hemi in HEMIS:
            lengths = {len(s.fsaverage_masks[hemi]) for s in self.subjects.values()}
            if len(lengths) != 1:
                raise DataError(
                    f"{self.root}: {hemi} fsaverage masks differ in length across subjects: {sorted(lengths)}"
                )
            sizes[hemi] = lengths.pop()
            union = np.logical_or.reduce([s.fsaverage_masks[hemi] for s in self.subjects.values()])
            index[hemi] = np.flatnonzero(union)
        return GroupSpace(index, sizes)

    def group_index(self, subject: str) -> np.ndarray:
        """Group-space index of each of a subject's native vertices."""
        return self.group.index_of(self.subjects[subject].fsaverage_masks)

    def unique_images(self, splits: tuple[str, ...] = SPLITS) -> ImageIndex:
        first: dict[int, Path] = {}
        for subject in self.subjects.values():
            for split in splits:
                for nsd, path in zip(subject.nsd_ids[split].tolist(), subject.images[split], strict=True):
                    first.setdefault(nsd, path)
        ids = np.asarray(sorted(first), dtype=np.int64)
        return ImageIndex(ids, tuple(first[i] for i in ids.tolist()))

    def validation_split(self, fraction: float = 0.1, seed: int = 0) -> ValidationSplit:
        """Hold out a `fraction` of the unique training images, across all subjects at once."""
        if not 0 < fraction < 1:
            raise DataError(f"validation fraction must be in (0, 1), got {fraction}")
        ids = self.unique_images(("train",)).nsd_ids
        n_val = max(1, round(fraction * len(ids)))
        rng = np.random.default_rng(seed)
        return ValidationSplit(seed, fraction, np.sort(rng.choice(ids, size=n_val, replace=False)))
