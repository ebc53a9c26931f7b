"""Reader for the Algonauts 2023 challenge layout (see docs/data.md): one implementation of the
`Dataset` protocol (blobenc.data.base).

Subjects, image counts and vertex counts all come from the files. Each subject's
*native* vertex order is its lh challenge vertices then its rh ones, as in the
fMRI files. Its targets are fsaverage vertex ids with the left hemisphere first and
the right after it (rh vertex v is id v + 163842), the generic layout's
`surface: fsaverage` convention; the *group* space is the union of all subjects'
fsaverage masks in that order. Hemispheres matter only where the files split them:
the fMRI, the prediction files and the ROI tables.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from blobenc.data._io import load_array, load_label_mapping
from blobenc.data.base import (
    FSAVERAGE,
    HEMIS,
    SPLITS,
    DatasetBase,
    GroupSpace,
    ImageIndex,
    ValidationSplit,
    nsd_key,
    pick_subjects,
    read_prediction_file,
    write_array,
)
from blobenc.errors import DataError

__all__ = ["HEMIS", "ROI_GROUPS", "AlgonautsDataset", "AlgonautsSubject", "GroupSpace", "ImageIndex", "ValidationSplit"]

ROI_GROUPS = ("prf-visualrois", "floc-bodies", "floc-faces", "floc-places", "floc-words", "streams")
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
class AlgonautsSubject:
    """One subject's files. fMRI arrays are memory-mapped and checked on access."""

    name: str
    path: Path
    images: dict[str, tuple[Path, ...]]  # split -> sorted image paths
    nsd_ids: dict[str, np.ndarray]  # split -> NSD id per image row
    fsaverage_masks: dict[str, np.ndarray]  # hemi -> bool over the fsaverage vertices
    _cache: dict = field(default_factory=dict, repr=False)

    @cached_property
    def keys(self) -> dict[str, tuple[str, ...]]:
        """split -> image key of each row (`nsd-NNNNN`)."""
        return {split: tuple(nsd_key(i) for i in ids.tolist()) for split, ids in self.nsd_ids.items()}

    @property
    def n_vertices(self) -> dict[str, int]:
        return {h: int(m.sum()) for h, m in self.fsaverage_masks.items()}

    @property
    def n_vertices_total(self) -> int:
        return sum(self.n_vertices.values())

    @property
    def n_targets(self) -> int:
        return self.n_vertices_total

    @cached_property
    def targets(self) -> np.ndarray:
        """fsaverage id of each native vertex: lh vertices, then rh ones offset by the lh size."""
        lh, rh = (self.fsaverage_masks[h] for h in HEMIS)
        return np.concatenate([np.flatnonzero(lh), np.flatnonzero(rh) + len(lh)]).astype(np.int64)

    @property
    def parts(self) -> dict[str, np.ndarray]:
        n_lh = self.n_vertices["lh"]
        lh = np.arange(self.n_vertices_total) < n_lh
        return {"lh": lh, "rh": ~lh}

    def _fmri_path(self, split: str, hemi: str) -> Path:
        return self.path / _FMRI_FILES[split].format(hemi=hemi)

    def has_fmri(self, split: str) -> bool:
        return all(self._fmri_path(split, h).is_file() for h in HEMIS)

    has_responses = has_fmri

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

    responses = fmri_native

    def weights(self, split: str) -> None:
        """The challenge files carry no row weights."""
        return None

    def noise_ceiling(self, hemi: str | None = None) -> np.ndarray | None:
        """Noise ceiling per vertex as a fraction in [0, 1] (of `hemi`, or of every native vertex),
        or None when not shipped."""
        if hemi is None:
            parts = [self.noise_ceiling(h) for h in HEMIS]
            return None if any(p is None for p in parts) else np.concatenate(parts)
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

    def rois(self) -> dict[str, tuple[np.ndarray, dict[int, str]]]:
        """ROI group -> (label per native vertex, names); a hemisphere without its file is label 0."""
        out = {}
        for group in ROI_GROUPS:
            found = {h: self.roi_labels(group, h) for h in HEMIS}
            if all(f is None for f in found.values()):
                continue
            names = next(f[1] for f in found.values() if f is not None)
            labels = [f[0] if f is not None else np.zeros(self.n_vertices[h], np.int64) for h, f in found.items()]
            out[group] = (np.concatenate(labels), names)
        return out


Subject = AlgonautsSubject  # the name before the Dataset protocol


class AlgonautsDataset(DatasetBase):
    """An Algonauts 2023 challenge folder: `ROOT/subjNN/...`.

    Opening checks the layout (folders, image names, masks, fMRI shapes); array
    contents are checked when first read.
    """

    layout = "algonauts"
    surface = FSAVERAGE
    prediction_example = "subj01/lh_pred_test.npy"

    def __init__(self, root: Path | str, subjects: list[str] | None = None):
        self.root = Path(root)
        self.name = self.root.name
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and _SUBJECT_RE.match(p.name))
        if not found:
            raise DataError(f"{self.root}: no subject folders (expected subj01, subj02, ...)")
        found = pick_subjects(self.root, found, subjects)
        self.subjects: dict[str, AlgonautsSubject] = {name: self._open_subject(self.root / name) for name in found}

    @staticmethod
    def _open_subject(path: Path) -> AlgonautsSubject:
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
        subject = AlgonautsSubject(path.name, path, images, ids, masks)
        for split in SPLITS:
            if split == "train" or subject.has_fmri(split):
                for hemi in HEMIS:  # shapes only: headers are cheap, contents are checked on read
                    p = subject._fmri_path(split, hemi)
                    load_array(p, shape=(len(images[split]), subject.n_vertices[hemi]))
        return subject

    @cached_property
    def space_size(self) -> int:
        """Both hemispheres' fsaverage vertices, from the masks' lengths."""
        sizes = {}
        for hemi in HEMIS:
            lengths = {len(s.fsaverage_masks[hemi]) for s in self.subjects.values()}
            if len(lengths) != 1:
                raise DataError(
                    f"{self.root}: {hemi} fsaverage masks differ in length across subjects: {sorted(lengths)}"
                )
            sizes[hemi] = lengths.pop()
        if sizes["lh"] != sizes["rh"]:
            raise DataError(f"{self.root}: lh masks cover {sizes['lh']} fsaverage vertices, rh masks {sizes['rh']}")
        return 2 * sizes["lh"]

    def _is_subject_folder(self, name: str) -> bool:
        return name.startswith("subj")

    def _prediction_path(self, out: Path, subject: str, hemi: str, split: str) -> Path:
        return Path(out) / subject / f"{hemi}_pred_{split}.npy"

    def write_predictions(
        self, out: Path, subject: str, pred: np.ndarray, split: str = "test", keys: Sequence[str] | None = None
    ) -> list[Path]:
        """Split a (rows, n_vertices) native-order prediction into OUT/subjNN/{lh,rh}_pred_<split>.npy."""
        s = self.subjects[subject]
        folder = Path(out) / subject
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for hemi, mask in s.parts.items():
            path = self._prediction_path(out, subject, hemi, split)
            write_array(path, np.ascontiguousarray(pred[:, mask], dtype=np.float32))
            paths.append(path)
        return paths

    def read_predictions(self, out: Path, subject: str, split: str = "test") -> np.ndarray:
        """(rows, n_vertices) native-order predictions from the lh/rh files, each checked."""
        s = self.subjects[subject]
        return np.concatenate(
            [
                read_prediction_file(
                    self._prediction_path(out, subject, hemi, split),
                    (len(s.images[split]), s.n_vertices[hemi]),
                    f"images x {hemi} vertices",
                )
                for hemi in HEMIS
            ],
            axis=1,
        )
