"""Checked readers for the .npy files of a dataset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from blobenc.errors import DataError

# What np.save writes for a dict: a 0-d object ndarray whose pickle needs these
# numpy constructors and nothing else. Anything outside this list (os.system,
# builtins.eval, ...) is refused before it can run.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            msg = f"{self._path}: refuses to unpickle {module}.{name}; expected a dict of ints to strings"
            raise DataError(msg)
        return super().find_class(module, name)


def load_label_mapping(path: Path) -> dict[int, str]:
    """Read a `mapping_<group>.npy` file (a pickled dict) without running code from it."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }[version]
            _, _, dtype = read_header(f)
            if dtype.hasobject:
                obj = _RestrictedUnpickler(f, path).load()
            else:
                obj = None
    except DataError:
        raise
    except Exception as e:  # a truncated or foreign file: name it, whatever the parser said
        raise DataError(f"{path}: not a readable .npy mapping ({type(e).__name__}: {e})") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict) or not all(
        isinstance(k, (int, np.integer)) and isinstance(v, str) for k, v in obj.items()
    ):
        raise DataError(f"{path}: expected a dict of ints to strings, found {type(obj).__name__}")
    return {int(k): v for k, v in obj.items()}


def load_array(
    path: Path,
    *,
    ndim: int | None = None,
    shape: tuple[int | None, ...] | None = None,
    finite: bool = False,
    mmap: bool = True,
) -> np.ndarray:
    """Load a .npy array, checking its shape (None = any size) and optionally finiteness.

    The file is memory-mapped by default so large fMRI files cost no RAM until read.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable numeric .npy array ({e})") from None
    if ndim is not None and arr.ndim != ndim:
        raise DataError(f"{path}: expected a {ndim}-d array, found shape {arr.shape}")
    if shape is not None:
        if len(shape) != arr.ndim or any(s is not None and s != a for s, a in zip(shape, arr.shape, strict=True)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise DataError(f"{path}: expected shape {want}, found {arr.shape}")
    if finite:
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"{path}: values of dtype {arr.dtype}, expected numbers (float32)")
        check_finite(arr, path)
    return arr


def check_finite(arr: np.ndarray, path: Path | str, what: str = "values") -> None:
    """Raise DataError if `arr` holds NaN or inf; reads a memmap in row blocks to bound RAM."""
    if not np.issubdtype(arr.dtype, np.floating):
        return
    step = max(1, (64 << 20) // max(1, arr[:1].nbytes))
    for start in range(0, max(len(arr), 1), step):
        block = np.asarray(arr[start : start + step])
        if not np.isfinite(block).all():
            bad = np.argwhere(~np.isfinite(block))[0]
            bad[0] += start
            raise DataError(f"{path}: non-finite {what} (first at index {tuple(int(i) for i in bad)})")
