"""Group PCA: the frozen embedding from the head's low dimension back to group vertex space."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from blobenc.data.base import HEMIS, GroupSpace
from blobenc.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def _row_blocks(n: int, size: int = 2048) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# The exact (Gram) route while m = min(samples, vertices) is at most this (an m x m float64
# accumulation and float32 eigendecomposition; 20000 = 3.2 GB)...
GRAM_MAX_SAMPLES = 20000
# ...and at most this many times the randomized finder's width: beyond it the randomized passes
# (2 * power iterations + 2 products of n x v x (k + 10)) cost less than the m x m Gram and eigh.
GRAM_MAX_WIDTH_RATIO = 8
OVERSAMPLES = 10
POWER_ITERATIONS = 4
BACKENDS = ("auto", "torch", "gram", "randomized", "sklearn")


def _route(n: int, v: int, k: int) -> str:
    """'gram' (exact) while min(n, v) is small next to the randomized finder's width, else 'randomized'."""
    m, width = min(n, v), min(k + OVERSAMPLES, n, v)
    return "gram" if m <= GRAM_MAX_SAMPLES and m <= GRAM_MAX_WIDTH_RATIO * width else "randomized"


def _column_blocks(v: int, n: int, budget: int = 256 << 20) -> list[slice]:
    """Column blocks of an (n, v) float32 matrix, ~`budget` bytes each (at least 256 columns)."""
    return _row_blocks(v, max(256, budget // (4 * max(n, 1))))


class _SampleGram:
    """G = Xc Xcᵀ (n x n, float64) of the column-centred Y (n <= v), accumulated over column
    blocks of Y with no centred copy, and updatable column by column: EM imputation changes only
    the columns some sample lacks, so a refit costs n² x (those columns), not n² x v.

    Its top-k eigenpairs (s², U) are the PCA: Xc = U S Vᵀ, components Vᵀ = Uᵀ Xc / s, and the
    rank-k reconstruction of the data is U Uᵀ Xc (no components needed for EM steps)."""

    def __init__(self, Y: np.ndarray, device: torch.device):
        self.host, self.device = torch.from_numpy(Y), device  # shares Y's memory
        n, v = Y.shape
        self.mean = torch.empty(v, dtype=torch.float64)
        self.sumsq = torch.empty(v, dtype=torch.float64)  # centred sum of squares per column
        self.G = torch.zeros(n, n, dtype=torch.float64, device=device)
        for cb in _column_blocks(v, n):
            self._add(cb)

    def _centred(self, cols) -> torch.Tensor:
        """Centred float32 columns `cols` on the device; their mean and sum of squares recorded."""
        x = self.host[:, cols].to(self.device, torch.float64)
        m = x.mean(0)
        x -= m
        self.mean[cols], self.sumsq[cols] = m.cpu(), (x * x).sum(0).cpu()
        return x.float()

    def _add(self, cols) -> None:
        x = self._centred(cols)
        self.G += x @ x.T  # float32 product added into float64 in place: no float64 copy of it

    def replace_columns(self, cols: np.ndarray, old: np.ndarray) -> None:
        """Columns `cols` of Y were `old` (n, len(cols)) and now hold new values: update G."""
        x = torch.from_numpy(old).to(self.device, torch.float64)
        x = (x - x.mean(0)).float()
        self.G -= x @ x.T
        self._add(torch.from_numpy(cols))

    @property
    def total_variance(self) -> float:
        return float(self.sumsq.sum()) / (len(self.G) - 1)

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(s² (k,), U (n, k)) largest first; float32 eigendecomposition (2.6x faster than float64
        at n = 7200 on the CPU; eigenvalues good to ~1e-7 of the largest)."""
        evals, evecs = torch.linalg.eigh(self.G.float())  # ascending
        return evals[-k:].flip(0).clamp_min(0), evecs[:, -k:].flip(1)

    def reconstruct(self, U: torch.Tensor, cols: np.ndarray) -> np.ndarray:
        """(n, len(cols)) rank-k reconstruction U Uᵀ Xc + mean of the columns `cols`."""
        idx = torch.from_numpy(cols)
        x = self.host[:, idx].to(self.device) - self.mean[idx].float().to(self.device)
        return (U @ (U.T @ x) + self.mean[idx].float().to(self.device)).cpu().numpy()

    def components(self, s2: torch.Tensor, U: torch.Tensor) -> np.ndarray:
        """(k, v) components Uᵀ Xc / s, by column blocks."""
        n, v = self.host.shape
        inv_s = torch.where(s2 > 0, s2.rsqrt(), torch.zeros_like(s2))
        mean = self.mean.float().to(self.device)
        out = torch.empty(len(s2), v, dtype=torch.float32)
        for cb in _column_blocks(v, n):
            out[:, cb] = ((U.T @ (self.host[:, cb].to(self.device) - mean[cb])) * inv_s[:, None]).cpu()
        return out.numpy()


def _torch_pca(Y: np.ndarray, k: int, device: torch.device, seed: int, route: str):
    """One PCA of Y (n, v) in float32 with torch, centred on the fly (no centred copy of Y):
    (mean (v,), components (k, v), explained variance (k,), total variance, solver name).

    route "gram" with n > v: the v x v covariance Xcᵀ Xc over row blocks, components its top
    eigenvectors (n <= v goes through _SampleGram in GroupPCA.fit). "randomized": a randomized
    range finder as scikit-learn's (Halko et al. 2011: k + 10 columns, 4 power iterations with QR
    re-orthonormalisation), then the SVD of the small projected matrix. On CUDA, blocks of Y
    (Gram) or Y itself (randomized) go to the GPU.
    """
    n, v = Y.shape
    host = torch.from_numpy(Y)  # shares Y's memory
    mean64, total = torch.zeros(v, dtype=torch.float64), 0.0
    for cb in _column_blocks(v, n):  # mean and total variance, float64 accumulation
        x = host[:, cb].to(device, torch.float64)
        m = x.mean(0)
        x -= m  # in place, and a norm rather than squares: no more block-sized temporaries
        total += float(torch.linalg.vector_norm(x)) ** 2
        mean64[cb] = m.cpu()
    mean = mean64.float()
    mean_d = mean.to(device)
    if route == "gram":
        C = torch.zeros(v, v, dtype=torch.float64, device=device)
        for rb in _row_blocks(n, max(256, (256 << 20) // (4 * v))):
            x = host[rb].to(device) - mean_d
            C += (x.T @ x).double()
        evals, evecs = torch.linalg.eigh(C.float())
        s2 = evals[-k:].flip(0).clamp_min(0)
        comp = evecs[:, -k:].flip(1).T.contiguous().cpu().numpy()
        return mean.numpy(), comp, (s2 / (n - 1)).cpu().numpy(), total / (n - 1), "torch-gram"
    y = host.to(device) if device.type == "cuda" else host
    ones = torch.ones(n, 1, device=device)

    def xc_mm(w):  # (Y - 1 mᵀ) @ w
        return y @ w - ones @ (mean_d[None] @ w)

    def xct_mm(q):  # (Y - 1 mᵀ)ᵀ @ q
        return y.T @ q - mean_d[:, None] @ q.sum(0, keepdim=True)

    gen = torch.Generator(device=device).manual_seed(seed)
    Q = xc_mm(torch.randn(v, min(k + OVERSAMPLES, n, v), generator=gen, device=device))
    for _ in range(POWER_ITERATIONS):
        Q = xc_mm(torch.linalg.qr(xct_mm(torch.linalg.qr(Q).Q)).Q)
    Q = torch.linalg.qr(Q).Q
    _, S, Vt = torch.linalg.svd(xct_mm(Q).T, full_matrices=False)  # of Qᵀ Xc (k + 10, v)
    comp = Vt[:k].contiguous().cpu().numpy()
    return mean.numpy(), comp, (S[:k] ** 2 / (n - 1)).cpu().numpy(), total / (n - 1), "torch-randomized"


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
    backend : "auto" = "torch": float32, centred on the fly, on `device` (CUDA when given); the
        exact Gram route while min(samples, vertices) is small next to n_components, else a
        randomized range finder (see _torch_pca; docs/benchmarks.md compares it with scikit-learn).
        "gram" / "randomized": torch, that route forced. "sklearn": scikit-learn's randomized PCA
        (on a centred copy of Y).

    Fitted attributes: components_ (n_components, n_vertices), mean_ (n_vertices,),
    explained_variance_ (n_components,), explained_variance_ratio_ (n_components,), solver_ (str).
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
        if backend not in BACKENDS:
            raise ConfigError(f"PCA backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.n_components, self.backend, self.n_iter, self.seed = n_components, backend, n_iter, seed
        self.device = torch.device(device)
        self.group: GroupSpace | None = None

    def fit_memory(self, n: int, v: int, incomplete_columns: int = 0) -> int:
        """Bytes a torch fit of (n, v) data holds besides Y and its mask, at its peak: the Gram
        matrix (float64), its float32 copy, eigenvectors and LAPACK's workspace (~24 m² for the
        m x m Gram), or the randomized finder's n x w and v x w blocks; the column blocks it reads;
        then the components. With missing entries the Gram route's EM steps hold ~5 (n, c) float32
        arrays of the `incomplete_columns` c some sample lacks (their old values, the
        reconstruction, its temporaries). Measured by benchmarks/plan.py (docs/benchmarks.md)."""
        k = min(self.n_components, n, v)
        route = _route(n, v, k) if self.backend in ("auto", "torch") else self.backend
        block = min(256 << 20, 4 * n * v)  # the column blocks read, copied to float64 and centred
        if route == "gram":
            m = min(n, v)
            work = 24 * m * m + 4 * block  # the block, its float64 copy, its squares, its float32 copy
            if n <= v:
                work += 5 * 4 * n * incomplete_columns
        else:
            width = min(k + OVERSAMPLES, n, v)
            work = 16 * (n + v) * width + 3 * block  # the block and its float64 copy, centred in place
        return work + 2 * 4 * k * v

    def fit(self, Y: np.ndarray, mask: np.ndarray | None = None, *, copy: bool = True) -> GroupPCA:
        """Y: (n_samples, n_vertices); mask: same shape, True where observed (None: all observed).

        copy=False works in Y itself (float32; its missing entries end up imputed): at NSD scale
        Y is 12 GB, so the fit holds it once, nothing the size of Y besides with the torch backend
        (centred on the fly; imputation and variances go by blocks of rows; scikit-learn's makes a
        centred copy)."""
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
        route = _route(n, v, k) if self.backend in ("auto", "torch") else self.backend
        if route == "gram" and n <= v:
            self._fit_sample_gram(Y, mask, incomplete, k)
            return self
        for it in range(1 + (self.n_iter if len(incomplete) else 0)):
            self._fit_complete(Y, k, route)
            if it < self.n_iter:
                self._impute(Y, mask, incomplete, lambda y: self.inverse_transform(self.transform(y)))
        return self

    def _fit_sample_gram(self, Y: np.ndarray, mask: np.ndarray | None, incomplete: np.ndarray, k: int) -> None:
        """The EM fit through the n x n Gram matrix (n <= v): one pass over Y for G, then per EM
        step an eigendecomposition and the reconstruction of the missing entries only (U Uᵀ Xc at
        the columns some sample lacks; G updated at those columns), and the components once."""
        gram = _SampleGram(Y, self.device)
        cols = np.flatnonzero(~mask[incomplete].all(0)) if len(incomplete) else np.zeros(0, np.int64)
        for it in range(1 + (self.n_iter if len(incomplete) else 0)):
            s2, U = gram.top(k)
            if it == self.n_iter or not len(incomplete):
                break
            old = Y[:, cols]
            Y[:, cols] = np.where(mask[:, cols], old, gram.reconstruct(U, cols))
            gram.replace_columns(cols, old)
        self.mean_ = gram.mean.float().numpy()
        variance = (s2 / (len(Y) - 1)).cpu().numpy()
        self._set_fit(gram.components(s2, U), variance, gram.total_variance, "torch-gram")

    @staticmethod
    def _impute(Y: np.ndarray, mask: np.ndarray, rows: np.ndarray, fill) -> None:
        """Y[r, ~mask[r]] = fill(Y[r])[~mask[r]] for the rows r with missing entries, by blocks of
        256 rows: a block's copies (its rows, mask, reconstruction) are ~6 x 40 MB at the NSD's
        39.5k vertices, where blocks of 2048 rows took 1.6 GB."""
        for b in _row_blocks(len(rows), 256):
            r = rows[b]
            y, m = Y[r], mask[r]
            Y[r] = np.where(m, y, fill(y))

    def _fit_complete(self, Y: np.ndarray, k: int, route: str) -> None:
        if route == "sklearn":
            from sklearn.decomposition import PCA  # only this backend: 1.2 s of import predict does not need

            pca = PCA(n_components=k, svd_solver="randomized" if k < min(Y.shape) else "full", random_state=self.seed)
            pca.fit(Y)
            self.mean_ = pca.mean_.astype(np.float32)
            self.components_ = np.ascontiguousarray(pca.components_, dtype=np.float32)
            self.explained_variance_ = pca.explained_variance_.astype(np.float32)
            self.explained_variance_ratio_ = pca.explained_variance_ratio_.astype(np.float32)
            self.solver_ = "sklearn-randomized" if k < min(Y.shape) else "sklearn-full"
            return
        self.mean_, components, variance, total_var, solver = _torch_pca(Y, k, self.device, self.seed, route)
        self._set_fit(components, variance, total_var, solver)

    def _set_fit(self, components: np.ndarray, variance: np.ndarray, total_var: float, solver: str) -> None:
        """Fitted attributes of a torch fit, in scikit-learn's sign convention (svd_flip: each
        component's largest |loading| positive) for comparability."""
        k = len(components)
        signs = np.sign(components[np.arange(k), np.abs(components).argmax(1)])
        self.components_ = np.ascontiguousarray(components * signs[:, None], dtype=np.float32)
        self.explained_variance_ = variance.astype(np.float32)
        self.explained_variance_ratio_ = (variance / total_var).astype(np.float32)
        self.solver_ = solver

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
