"""Group PCA: the frozen embedding from the head's low dimension back to group vertex space."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from sklearn.decomposition import PCA

from blobenc.data.base import HEMIS, GroupSpace
from blobenc.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def _row_blocks(n: int, size: int = 2048) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class GroupPCA:
    """PCA of responses in group space, with missing entries handled by EM imputation.

    The rows come from several subjects; the vertices a subject lacks are missing,
    not zero. They start at the vertex mean (so they add nothing to the first fit)
    and are then replaced, `n_iter` times, by their reconstruction from the
    current components (EM-PCA), so they follow the low-rank structure the
    observed vertices show instead of pulling the components toward the mean.

    Parameters
    ----------
    n_components : int, capped at min(n_samples, n_vertices).
    backend : "auto" (torch low-rank SVD on CUDA, else scikit-learn's randomized PCA),
        "sklearn" or "torch".

    Fitted attributes: components_ (n_components, n_vertices), mean_ (n_vertices,),
    explained_variance_ (n_components,), explained_variance_ratio_ (n_components,).
    """

    def __init__(
        self,
        n_components: int = 2048,
        *,
        backend: str = "auto",
        n_iter: int = 2,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        if backend not in ("auto", "sklearn", "torch"):
            raise ConfigError(f"PCA backend {backend!r}: expected auto, sklearn or torch")
        self.n_components, self.backend, self.n_iter, self.seed = n_components, backend, n_iter, seed
        self.device = torch.device(device)
        self.group: GroupSpace | None = None

    def fit(self, Y: np.ndarray, mask: np.ndarray | None = None, *, copy: bool = True) -> GroupPCA:
        """Y: (n_samples, n_vertices); mask: same shape, True where observed (None: all observed).

        copy=False works in Y itself (float32; its missing entries end up imputed): at NSD scale
        Y is 12 GB, so the fit holds it once plus scikit-learn's centred copy, nothing the size of Y
        besides (imputation and variances go by blocks of rows)."""
        Y = np.array(Y, dtype=np.float32) if copy else np.asarray(Y, dtype=np.float32)
        n, v = Y.shape
        k = min(self.n_components, n, v)
        if k < 1:
            raise DataError(f"cannot fit a PCA on {n} samples x {v} vertices")
        incomplete = np.zeros(0, dtype=np.int64)
        if mask is not None:
            counts = mask.sum(0)
            if (counts == 0).any():
                raise DataError(f"{int((counts == 0).sum())} group vertices are observed in no sample")
            mean = sum(np.where(mask[b], Y[b], 0).sum(0) for b in _row_blocks(n)) / counts
            incomplete = np.flatnonzero(~mask.all(1))
            self._impute(Y, mask, incomplete, lambda y: np.broadcast_to(mean, y.shape))
        for it in range(1 + (self.n_iter if len(incomplete) else 0)):
            self._fit_complete(Y, k)
            if it < self.n_iter:
                self._impute(Y, mask, incomplete, lambda y: self.inverse_transform(self.transform(y)))
        return self

    @staticmethod
    def _impute(Y: np.ndarray, mask: np.ndarray, rows: np.ndarray, fill) -> None:
        """Y[r, ~mask[r]] = fill(Y[r])[~mask[r]] for the rows r with missing entries, block by block."""
        for b in _row_blocks(len(rows)):
            r = rows[b]
            y, m = Y[r], mask[r]
            Y[r] = np.where(m, y, fill(y))

    def _fit_complete(self, Y: np.ndarray, k: int) -> None:
        backend = self.backend
        if backend == "auto":
            backend = "torch" if self.device.type == "cuda" else "sklearn"
        if backend == "sklearn":
            pca = PCA(n_components=k, svd_solver="randomized" if k < min(Y.shape) else "full", random_state=self.seed)
            pca.fit(Y)
            self.mean_ = pca.mean_.astype(np.float32)
            self.components_ = np.ascontiguousarray(pca.components_, dtype=np.float32)
            self.explained_variance_ = pca.explained_variance_.astype(np.float32)
            self.explained_variance_ratio_ = pca.explained_variance_ratio_.astype(np.float32)
            return
        torch.manual_seed(self.seed)
        y = torch.as_tensor(Y, device=self.device)
        mean = y.mean(0)
        _, s, vt = torch.svd_lowrank(y - mean, q=min(k + 10, min(Y.shape)), niter=6)
        self.mean_ = mean.cpu().numpy()
        self.components_ = vt.T[:k].contiguous().cpu().numpy()
        self.explained_variance_ = (s[:k] ** 2 / (len(Y) - 1)).cpu().numpy()
        # sign convention as scikit-learn's svd_flip (largest |loading| positive) for comparability
        signs = np.sign(self.components_[np.arange(k), np.abs(self.components_).argmax(1)])
        self.components_ *= signs[:, None]
        total_var = sum(float(((Y[b] - self.mean_) ** 2).sum()) for b in _row_blocks(len(Y))) / (len(Y) - 1)
        self.explained_variance_ratio_ = self.explained_variance_ / total_var

    def transform(self, Y: np.ndarray) -> np.ndarray:
        """(n, n_vertices) -> (n, n_components)."""
        return (np.asarray(Y, dtype=np.float32) - self.mean_) @ self.components_.T

    def inverse_transform(self, Z: np.ndarray) -> np.ndarray:
        """(n, n_components) -> (n, n_vertices)."""
        return np.asarray(Z, dtype=np.float32) @ self.components_ + self.mean_

    def save(self, path: Path | str) -> None:
        """safetensors: components, mean, explained variance and the group space it belongs to."""
        if self.group is None:
            raise ConfigError("set GroupPCA.group (the vertex space) before saving")
        # safetensors writes the raw buffer: sklearn's Fortran-ordered components_ would load transposed
        arrays = {
            "components": self.components_,
            "mean": self.mean_,
            "explained_variance": self.explained_variance_,
            "explained_variance_ratio": self.explained_variance_ratio_,
        }
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        tensors["index"] = np.ascontiguousarray(self.group.index, dtype=np.int64)
        space = {"size": int(self.group.size), "surface": self.group.surface}
        meta = {"format": "blobenc.group_pca", "version": "2", "space": json.dumps(space)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path | str) -> GroupPCA:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: PCA file not found")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for foreign files
            raise DataError(f"{path}: not a safetensors file ({type(e).__name__})") from None
        if meta.get("format") != "blobenc.group_pca":
            raise DataError(f"{path}: not a blobenc group PCA file")
        pca = cls(len(tensors["components"]))
        pca.components_, pca.mean_ = tensors["components"], tensors["mean"]
        pca.explained_variance_ = tensors["explained_variance"]
        pca.explained_variance_ratio_ = tensors["explained_variance_ratio"]
        if "index" in tensors:
            space = json.loads(meta["space"])
            pca.group = GroupSpace(tensors["index"].astype(np.int64), int(space["size"]), space.get("surface"))
        else:  # version 1: per-hemisphere fsaverage indices
            pca.group = GroupSpace.from_hemispheres(
                {h: tensors[f"{h}_fsaverage_index"] for h in HEMIS},
                {h: int(s) for h, s in json.loads(meta["fsaverage_size"]).items()},
            )
        return pca
