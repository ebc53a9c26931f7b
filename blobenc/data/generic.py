"""The generic layout: any image -> response dataset (docs/data.md "Generic layout").

```
ROOT/dataset.yaml            format: blobenc-generic/1, name, images, [space], [surface]
ROOT/images/...              the images; a key is a path relative to this folder
ROOT/subjects/<name>/        train.csv + train.npy|train.zarr, optional test.csv (+ test.npy|zarr),
                             targets.npy, noise_ceiling.npy, rois.npy + rois.json
```

Everything is checked when the dataset opens, responses included (read block by block), so
a problem is one `DataError` naming the file and row before any work starts. Responses stay
on disk (memory-mapped .npy or Zarr) and are read by rows.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath

import numpy as np
import yaml

from blobenc.data._io import load_array
from blobenc.data.base import (
    FSAVERAGE,
    FSAVERAGE_SIZE,
    SPLITS,
    WHOLE,
    Dataset,
    DatasetBase,
    pick_subjects,
    read_prediction_file,
    write_array,
)
from blobenc.errors import DataError, PredictionError
from blobenc.files import atomic_path

logger = logging.getLogger(__name__)

GENERIC_FORMAT = "blobenc-generic/1"
_YAML_KEYS = ("format", "name", "images", "space", "surface")
_COLUMNS = ("image", "weight")
_SUBJECT_FILES = {
    "train.csv",
    "train.npy",
    "train.zarr",
    "test.csv",
    "test.npy",
    "test.zarr",
    "targets.npy",
    "noise_ceiling.npy",
    "rois.npy",
    "rois.json",
}
_BLOCK_BYTES = 64 << 20  # responses are checked and read in blocks of about this size


@dataclass(frozen=True)
class _Rows:
    """One split's rows from its CSV file."""

    keys: tuple[str, ...]
    paths: tuple[Path, ...]
    weights: np.ndarray | None


@dataclass(frozen=True, eq=False)
class GenericSubject:
    """One subject folder of the generic layout; responses are read lazily by rows."""

    name: str
    path: Path
    images: dict[str, tuple[Path, ...]]  # split -> image file per row
    keys: dict[str, tuple[str, ...]]  # split -> image key per row
    targets: np.ndarray  # (n_targets,) ids in the common space
    hemi_size: int | None  # fsaverage: targets below it are lh
    files: dict[str, Path]  # split -> responses file (.npy or .zarr), where present
    _weights: dict[str, np.ndarray | None] = field(repr=False)
    _ceiling: np.ndarray | None = field(repr=False)
    _rois: dict[str, tuple[np.ndarray, dict[int, str]]] = field(repr=False)
    _arrays: dict = field(default_factory=dict, repr=False)

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @cached_property
    def parts(self) -> dict[str, np.ndarray]:
        if self.hemi_size is not None:
            lh = self.targets < self.hemi_size
            return {"lh": lh, "rh": ~lh}
        return {WHOLE: np.ones(self.n_targets, dtype=bool)}

    def has_responses(self, split: str) -> bool:
        return split in self.files

    def array(self, split: str):
        """The responses of `split` on disk: a memory-mapped ndarray or a Zarr array."""
        if split not in self._arrays:
            if split not in self.files:
                raise DataError(f"{self.path}: no {split} responses ({split}.npy or {split}.zarr)")
            arr = _open_responses(self.files[split])
            _check_finite(self.files[split], arr, self.path / f"{split}.csv")
            self._arrays[split] = arr
        return self._arrays[split]

    def responses(self, split: str, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, n_targets) float32 in RAM: every row of `split`, or only `rows` (any order, repeats
        allowed), read from disk block by block."""
        arr = self.array(split)
        if rows is None:
            return np.asarray(arr[:], dtype=np.float32)
        return _take_rows(arr, np.asarray(rows, dtype=np.int64))

    def weights(self, split: str) -> np.ndarray | None:
        return self._weights.get(split)

    def noise_ceiling(self) -> np.ndarray | None:
        return self._ceiling

    def rois(self) -> dict[str, tuple[np.ndarray, dict[int, str]]]:
        return self._rois


def _open_responses(path: Path):
    if path.suffix == ".zarr":
        import zarr

        try:
            return zarr.open_array(path, mode="r")
        except Exception as e:  # zarr raises several types for a folder that is not an array
            raise DataError(f"{path}: not a readable Zarr array ({type(e).__name__}: {e})") from None
    return load_array(path)


def _check_finite(path: Path, arr, csv_path: Path) -> None:
    """Every response finite, read a block of rows at a time: once per file, on first use, not
    when the dataset opens (the full NSD's are 12 GB, and most commands read a few rows)."""
    step = max(1, _BLOCK_BYTES // max(1, arr.shape[1] * arr.dtype.itemsize))
    if not isinstance(arr, np.ndarray):  # Zarr: whole chunks
        step = max(int(arr.chunks[0]), step - step % int(arr.chunks[0]))
    for start in range(0, arr.shape[0], step):
        block = np.asarray(arr[start : start + step])
        if not np.isfinite(block).all():
            r, t = np.argwhere(~np.isfinite(block))[0]
            raise DataError(
                f"{path}: row {start + r} ({csv_path.name} line {start + r + 2}), target {t}: "
                f"{block[r, t]} is not a finite response"
            )


def _take_rows(arr, rows: np.ndarray) -> np.ndarray:
    """arr[rows] as float32; a Zarr array is read by whole blocks of rows (an index at a time is slow)."""
    if isinstance(arr, np.ndarray):
        return np.asarray(arr[rows], dtype=np.float32)
    out = np.empty((len(rows), arr.shape[1]), dtype=np.float32)
    if not len(rows):
        return out
    step = int(arr.chunks[0])
    block_of = rows // step
    for b in np.unique(block_of).tolist():
        sel = np.flatnonzero(block_of == b)
        out[sel] = arr[b * step : (b + 1) * step][rows[sel] - b * step]
    return out


def _key_problem(key: str) -> str | None:
    if not key:
        return "an empty image key"
    p = PurePosixPath(key)
    if "\\" in key or p.is_absolute() or ".." in p.parts or p.as_posix() != key:
        return f"image key {key!r} is not a plain relative path (use '/' and no '..' or './')"
    return None


class GenericDataset(DatasetBase):
    """A dataset in the generic layout (ROOT/dataset.yaml with `format: blobenc-generic/1`)."""

    layout = "generic"
    prediction_example = "<subject>/pred_test.npy"

    def __init__(self, root: Path | str, subjects: Sequence[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found")
        meta = self._read_meta(self.root / "dataset.yaml")
        self.name = str(meta.get("name", self.root.name))
        self.images_dir = self.root / str(meta.get("images", "images"))
        if not self.images_dir.is_dir():
            raise DataError(f"{self.root / 'dataset.yaml'}: images folder {self.images_dir} not found")
        self.surface = meta.get("surface")
        space = meta.get("space")
        if self.surface == FSAVERAGE and space is None:
            space = FSAVERAGE_SIZE
        self._exists: dict[str, bool] = {}

        folder = self.root / "subjects"
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found (one folder per subject: subjects/<name>/train.csv, ...)")
        found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise DataError(f"{folder}: no subject folders")
        found = pick_subjects(folder, found, subjects)

        parsed = {name: self._read_subject(folder / name) for name in found}
        self.space_size = self._space(parsed, space)
        hemi = self.space_size // 2 if self.surface == FSAVERAGE else None
        self.subjects: dict[str, GenericSubject] = {}
        for name, p in parsed.items():
            targets = p["targets"] if p["targets"] is not None else np.arange(self.space_size, dtype=np.int64)
            self.subjects[name] = GenericSubject(
                name=name,
                path=folder / name,
                images={s: r.paths for s, r in p["rows"].items()},
                keys={s: r.keys for s, r in p["rows"].items()},
                targets=targets,
                hemi_size=hemi,
                files=p["files"],
                _weights={s: r.weights for s, r in p["rows"].items()},
                _ceiling=p["ceiling"],
                _rois=p["rois"],
            )

    # -- dataset.yaml ---------------------------------------------------------------------

    @staticmethod
    def _read_meta(path: Path) -> dict:
        try:
            meta = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"{path}: not readable YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(meta, dict):
            raise DataError(f"{path}: expected a mapping with format: {GENERIC_FORMAT}")
        if meta.get("format") != GENERIC_FORMAT:
            raise DataError(f"{path}: format {meta.get('format')!r}, expected {GENERIC_FORMAT!r}")
        unknown = [k for k in meta if k not in _YAML_KEYS]
        if unknown:
            raise DataError(f"{path}: unknown key {unknown[0]!r}; valid keys: {', '.join(_YAML_KEYS)}")
        if not isinstance(meta.get("images", "images"), str):
            raise DataError(f"{path}: images: expected a folder name relative to the dataset root")
        space = meta.get("space")
        if space is not None and (isinstance(space, bool) or not isinstance(space, int) or space < 1):
            raise DataError(f"{path}: space: expected a positive integer, found {space!r}")
        surface = meta.get("surface")
        if surface not in (None, FSAVERAGE):
            raise DataError(f"{path}: surface: expected {FSAVERAGE!r} or nothing, found {surface!r}")
        if surface == FSAVERAGE and space is not None and space % 2:
            raise DataError(f"{path}: space {space}: an fsaverage surface has two hemispheres of equal size")
        return meta

    # -- one subject ----------------------------------------------------------------------

    def _read_subject(self, folder: Path) -> dict:
        for p in sorted(folder.iterdir()):
            if p.name not in _SUBJECT_FILES and not p.name.startswith("."):
                logger.warning("%s: not a file of the generic layout; ignored", p)
        rows, files = {}, {}
        for split in SPLITS:
            csv_path = folder / f"{split}.csv"
            responses = [p for p in (folder / f"{split}.npy", folder / f"{split}.zarr") if p.exists()]
            if len(responses) > 1:
                raise DataError(f"{folder}: both {split}.npy and {split}.zarr; keep one")
            if not csv_path.is_file():
                if split == "train":
                    raise DataError(f"{csv_path}: file not found (one row per training response: column image)")
                if responses:
                    raise DataError(f"{responses[0]}: {split} responses without {split}.csv to name their images")
                continue
            rows[split] = self._read_csv(csv_path)
            if split == "train" and not responses:
                raise DataError(f"{folder}: no training responses (train.npy or train.zarr)")
            if responses:
                files[split] = responses[0]

        n_targets = None
        for split, path in files.items():
            arr = _open_responses(path)
            n = self._check_responses(path, arr, len(rows[split].keys), folder / f"{split}.csv")
            if n_targets is not None and n != n_targets:
                raise DataError(f"{path}: {n} targets, but {files['train'].name} has {n_targets}")
            n_targets = n

        targets = None
        tpath = folder / "targets.npy"
        if tpath.exists():
            targets = np.asarray(load_array(tpath, shape=(n_targets,)))
            if not np.issubdtype(targets.dtype, np.integer):
                raise DataError(f"{tpath}: expected integer target ids, found dtype {targets.dtype}")
            targets = targets.astype(np.int64)
            if len(np.unique(targets)) != len(targets):
                _, first, counts = np.unique(targets, return_index=True, return_counts=True)
                t = int(np.flatnonzero(np.isin(targets, targets[first[counts > 1]]))[1])
                raise DataError(f"{tpath}: position {t}: target {int(targets[t])} appears twice")
            if (targets < 0).any():
                t = int(np.flatnonzero(targets < 0)[0])
                raise DataError(f"{tpath}: position {t}: target {int(targets[t])} is negative")

        ceiling = None
        cpath = folder / "noise_ceiling.npy"
        if cpath.exists():
            ceiling = np.asarray(load_array(cpath, shape=(n_targets,), finite=True), dtype=np.float64)
            bad = np.flatnonzero((ceiling < 0) | (ceiling > 1))
            if len(bad):
                raise DataError(f"{cpath}: position {int(bad[0])}: {ceiling[bad[0]]:.4g} is not a fraction in [0, 1]")

        return {
            "folder": folder,
            "rows": rows,
            "files": files,
            "n_targets": n_targets,
            "targets": targets,
            "ceiling": ceiling,
            "rois": self._read_rois(folder, n_targets),
        }

    def _read_csv(self, path: Path) -> _Rows:
        try:
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: empty file; expected a header line with column 'image'")
                header = [h.strip() for h in header]
                unknown = [h for h in header if h not in _COLUMNS]
                if unknown:
                    raise DataError(f"{path}: unknown column {unknown[0]!r}; columns: image, optional weight")
                if "image" not in header:
                    raise DataError(f"{path}: no column 'image'")
                if len(set(header)) != len(header):
                    raise DataError(f"{path}: a column appears twice in the header")
                col = {h: i for i, h in enumerate(header)}
                keys, weights = [], []
                for row in reader:
                    line = reader.line_num
                    if len(row) != len(header):
                        raise DataError(f"{path}: line {line}: {len(row)} fields, the header has {len(header)}")
                    key = row[col["image"]].strip()
                    problem = _key_problem(key)
                    if problem:
                        raise DataError(f"{path}: line {line}: {problem}")
                    if not self._image_exists(key):
                        raise DataError(f"{path}: line {line}: image {key!r} not found in {self.images_dir}")
                    keys.append(key)
                    if "weight" in col:
                        text = row[col["weight"]].strip()
                        try:
                            w = float(text)
                        except ValueError:
                            w = math.nan
                        if not math.isfinite(w) or w < 0:
                            raise DataError(f"{path}: line {line}: weight {text!r} is not a number >= 0")
                        weights.append(w)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        except csv.Error as e:
            raise DataError(f"{path}: not a readable CSV file ({e})") from None
        if not keys:
            raise DataError(f"{path}: no rows (a split needs at least one)")
        return _Rows(
            tuple(keys),
            tuple(self.images_dir / k for k in keys),
            np.asarray(weights, dtype=np.float64) if "weight" in col else None,
        )

    def _image_exists(self, key: str) -> bool:
        if key not in self._exists:
            self._exists[key] = (self.images_dir / key).is_file()
        return self._exists[key]

    @staticmethod
    def _check_responses(path: Path, arr, n_rows: int, csv_path: Path) -> int:
        """Shape and dtype of a responses array, from its header; returns its number of targets."""
        if arr.ndim != 2:
            raise DataError(f"{path}: expected a 2-d array (rows, targets), found shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise DataError(f"{path}: expected float responses, found dtype {arr.dtype}")
        if arr.shape[0] != n_rows:
            raise DataError(f"{path}: {arr.shape[0]} rows, but {csv_path.name} has {n_rows}")
        if arr.shape[1] < 1:
            raise DataError(f"{path}: no targets (shape {arr.shape})")
        return int(arr.shape[1])

    @staticmethod
    def _read_rois(folder: Path, n_targets: int) -> dict[str, tuple[np.ndarray, dict[int, str]]]:
        labels_path, names_path = folder / "rois.npy", folder / "rois.json"
        if not labels_path.exists() and not names_path.exists():
            return {}
        if not labels_path.exists() or not names_path.exists():
            have, lack = (labels_path, names_path) if labels_path.exists() else (names_path, labels_path)
            raise DataError(f"{have}: comes with {lack.name}, which is missing")
        labels = np.asarray(load_array(labels_path, shape=(n_targets,)))
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{labels_path}: expected integer ROI labels, found dtype {labels.dtype}")
        try:
            raw = json.loads(names_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{names_path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise DataError(f'{names_path}: expected an object of label to name, e.g. {{"1": "V1"}}')
        try:
            names = {int(k): v for k, v in raw.items()}
        except ValueError:
            bad = next(k for k in raw if not k.strip().lstrip("-").isdigit())
            raise DataError(f"{names_path}: label {bad!r} is not an integer") from None
        unknown = np.setdiff1d(np.unique(labels), [0, *names])
        if len(unknown):
            pos = int(np.flatnonzero(labels == unknown[0])[0])
            raise DataError(f"{labels_path}: position {pos}: label {int(unknown[0])} has no name in {names_path.name}")
        return {"rois": (labels.astype(np.int64), names)}

    def _space(self, parsed: dict, space: int | None) -> int:
        """The common space's size, with every subject's targets checked against it."""
        identity = {n: p for n, p in parsed.items() if p["targets"] is None}
        if space is None:
            counts = {p["n_targets"] for p in identity.values()}
            if len(counts) > 1:
                ranked = sorted(identity.values(), key=lambda p: p["n_targets"])
                a, b = ranked[0], ranked[-1]
                raise DataError(
                    f"{b['files']['train']}: {b['n_targets']} targets, {a['files']['train']} {a['n_targets']}: "
                    "without targets.npy every subject's targets must be the same space; add targets.npy files "
                    "or space: N to dataset.yaml"
                )
            if counts:
                space = counts.pop()
            else:
                space = 1 + max(int(p["targets"].max()) for p in parsed.values())
        for p in parsed.values():
            if p["targets"] is None:
                if p["n_targets"] != space:
                    raise DataError(
                        f"{p['files']['train']}: {p['n_targets']} targets, but the space has {space} and there is "
                        "no targets.npy to place them in it"
                    )
            elif (p["targets"] >= space).any():
                pos = int(np.flatnonzero(p["targets"] >= space)[0])
                raise DataError(
                    f"{p['folder'] / 'targets.npy'}: position {pos}: target {int(p['targets'][pos])} is outside "
                    f"the space [0, {space})"
                )
        return int(space)

    # -- predictions ----------------------------------------------------------------------

    def write_predictions(
        self, out: Path, subject: str, pred: np.ndarray, split: str = "test", keys: Sequence[str] | None = None
    ) -> list[Path]:
        """OUT/<subject>/pred_<split>.npy (rows x targets, the subject's own order) and
        OUT/<subject>/<split>.csv with each row's image key."""
        folder = Path(out) / subject
        folder.mkdir(parents=True, exist_ok=True)
        keys = list(keys if keys is not None else self.subjects[subject].keys[split])
        npy, table = folder / f"pred_{split}.npy", folder / f"{split}.csv"
        write_array(npy, np.ascontiguousarray(pred, dtype=np.float32))
        with atomic_path(table) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["image"])
            writer.writerows([k] for k in keys)
        return [npy, table]

    def read_predictions(self, out: Path, subject: str, split: str = "test") -> np.ndarray:
        s = self.subjects[subject]
        if split not in s.keys:
            raise PredictionError(f"{s.path}: no {split}.csv, so no {split} rows to score")
        folder = Path(out) / subject
        pred = read_prediction_file(folder / f"pred_{split}.npy", (len(s.keys[split]), s.n_targets), "rows x targets")
        table = folder / f"{split}.csv"
        if table.is_file():
            with table.open(newline="", encoding="utf-8-sig") as f:
                got = [row[0] if row else "" for row in list(csv.reader(f))[1:]]
            if tuple(got) != s.keys[split]:
                bad = next(
                    (i for i, (a, b) in enumerate(zip(got, s.keys[split], strict=False)) if a != b),
                    min(len(got), len(s.keys[split])),
                )
                raise PredictionError(
                    f"{table}: line {bad + 2}: rows differ from {s.path / f'{split}.csv'} "
                    f"({len(got)} rows, {len(s.keys[split])} expected)"
                )
        return pred


def write_generic(dataset: Dataset, out: Path | str, *, roi_group: str | None = None, link: bool = True) -> Path:
    """Write any dataset in the generic layout: images once (hard-linked where possible), per
    subject its rows, responses, target ids, noise ceiling and one ROI group (`roi_group`, or the
    first it has). Image keys get the file's extension when they lack one (`nsd-00013.png`)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: folder exists and is not empty; choose a new folder")
    images = out / "images"
    images.mkdir(parents=True)
    index = dataset.unique_images()
    new_key = {}
    for key, path in zip(index.keys, index.paths, strict=True):
        new_key[key] = key if PurePosixPath(key).suffix else f"{key}{path.suffix}"
        dst = images / new_key[key]
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            if not link:
                raise OSError
            os.link(path, dst)
        except OSError:
            shutil.copyfile(path, dst)
    meta = {"format": GENERIC_FORMAT, "name": dataset.name, "images": "images", "space": int(dataset.group.size)}
    if dataset.group.surface:
        meta["surface"] = dataset.group.surface
    (out / "dataset.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    for name, s in dataset.subjects.items():
        folder = out / "subjects" / name
        folder.mkdir(parents=True)
        for split in SPLITS:
            if not s.keys.get(split):
                continue
            weights = s.weights(split)
            with (folder / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["image", "weight"] if weights is not None else ["image"])
                for i, key in enumerate(s.keys[split]):
                    writer.writerow([new_key[key], repr(float(weights[i]))] if weights is not None else [new_key[key]])
            if s.has_responses(split):
                np.save(folder / f"{split}.npy", s.responses(split))
        np.save(folder / "targets.npy", np.asarray(s.targets, dtype=np.int64))
        ceiling = s.noise_ceiling()
        if ceiling is not None:
            np.save(folder / "noise_ceiling.npy", ceiling.astype(np.float32))
        rois = s.rois()
        group = roi_group or next(iter(rois), None)
        if group is not None and group in rois:
            labels, names = rois[group]
            np.save(folder / "rois.npy", labels.astype(np.int32))
            (folder / "rois.json").write_text(json.dumps({str(k): v for k, v in sorted(names.items())}, indent=1))
    return out
