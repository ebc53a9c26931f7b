"""Closed-form ridge on cached features: layer reductions, per-layer z-scoring, leave-one-out alpha
per target, and banded (one kernel per layer) ridge through himalaya.

Conventions. Each layer's reduced features are z-scored over a subject's training images and
weighted by 1/d_l, so every layer adds about n to the trace of the linear kernel

    K = sum_l Z_l Z_l^T / d_l,

whatever its width. Targets are centred by their training mean; there is no intercept beyond it.
Every solution is returned as weights W_l (d_l, V) on the z-scored features Z_l (the primal form,
whichever way it was solved) or, when that would not fit, as dual coefficients over the training
images, whose features are then needed again to predict.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from blobenc.errors import ConfigError

logger = logging.getLogger(__name__)

FEATURE_MODES = ("mean", "cls", "tokens", "pool=N")
_POOL = re.compile(r"^pool=(\d+)$")


def check_features(mode: str) -> str:
    if mode in ("mean", "cls", "tokens") or (_POOL.match(mode) and int(mode[5:]) > 0):
        return mode
    raise ConfigError(f"--features {mode!r}: expected one of {', '.join(FEATURE_MODES)} (N a positive integer)")


def reduced_dim(mode: str, layer_shape: list[int], prefix: int) -> int:
    """Width of a layer's reduced feature vector."""
    if len(layer_shape) == 3:  # CNN map (C, H, W)
        c, h, w = layer_shape
        spatial, channels = h * w, c
    else:  # ViT tokens (L, C)
        spatial, channels = layer_shape[0] - prefix, layer_shape[1]
    if mode == "tokens":
        return int(np.prod(layer_shape))
    if mode.startswith("pool="):
        n = int(mode[5:])
        if n * n > spatial:
            raise ConfigError(f"--features {mode}: the layer has only {spatial} positions ({layer_shape})")
        return n * n * channels
    return channels


def reduce_layer(x: np.ndarray | torch.Tensor, mode: str, prefix: int, name: str = "layer") -> torch.Tensor:
    """(n, L, C) tokens or (n, C, H, W) maps -> (n, d) float32 features.

    mean: over patch tokens (prefix tokens left out) or spatial positions; cls: the first prefix
    token; tokens: everything flattened; pool=N: patch tokens or maps averaged to an N x N grid."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if mode == "tokens":
        return x.flatten(1)
    if x.ndim == 4:
        maps = x
    elif x.ndim == 3:
        if mode == "cls":
            if prefix < 1:
                raise ConfigError(f"--features cls: layer {name} has no class token; use mean or pool=N")
            return x[:, 0]
        patches = x[:, prefix:]
        if mode == "mean":
            return patches.mean(1)
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ConfigError(f"--features {mode}: layer {name}'s {patches.shape[1]} patch tokens are not a square")
        maps = patches.transpose(1, 2).reshape(len(x), x.shape[2], side, side)
    else:
        raise ConfigError(f"layer {name}: expected (n, L, C) tokens or (n, C, H, W) maps, got {tuple(x.shape)}")
    if mode == "cls":
        raise ConfigError(f"--features cls: layer {name} is a feature map with no class token; use mean or pool=N")
    if mode == "mean":
        return maps.mean((2, 3))
    return F.adaptive_avg_pool2d(maps, int(mode[5:])).flatten(1)


@dataclass
class LayerScaler:
    """Per-column mean and std over a subject's training images (columns with no spread pass
    through as 0), and the layer weight 1/d that equalises layers in the kernel."""

    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)

    @classmethod
    def fit(cls, x: torch.Tensor) -> LayerScaler:
        x64 = x.double()
        mean, std = x64.mean(0), x64.std(0, correction=0)
        return cls(mean.float(), torch.where(std > 0, std, torch.ones_like(std)).float())

    @property
    def weight(self) -> float:
        return 1.0 / len(self.mean)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.device) - self.mean) / self.std


def default_alphas(trace: float, n: int = 22) -> np.ndarray:
    """A log grid of `n` alphas from 1e-6 to 10 times the kernel's trace: a grid that follows the
    scale of the kernel, so it fits any number of images and layers."""
    return trace * np.logspace(-6, 1, n)


def check_alphas(alphas) -> np.ndarray:
    a = np.asarray(alphas, dtype=np.float64).ravel()
    if len(a) == 0 or not np.isfinite(a).all() or (a <= 0).any():
        raise ConfigError(f"--alphas {list(a)}: expected positive finite values")
    return np.sort(a)


@dataclass
class LooResult:
    best_alpha: torch.Tensor  # (V,)
    loo_mse: torch.Tensor  # (V,)
    coef: torch.Tensor  # (d, V) primal or (n, V) dual coefficients at each target's best alpha
    curve: torch.Tensor | None = None  # (n_alphas, V) leave-one-out mse at every alpha, when asked for


def _target_blocks(v: int, block: int) -> list[slice]:
    return [slice(i, min(i + block, v)) for i in range(0, v, block)]


def loo_ridge(
    X: torch.Tensor | None,
    K: torch.Tensor | None,
    Y: torch.Tensor,
    alphas: np.ndarray,
    target_block: int = 4096,
    intercept: bool = True,
    curve: bool = False,
) -> LooResult:
    """Ridge with one alpha per target chosen by exact leave-one-out error, from one decomposition.

    X (n, d) / K (n, n) and Y are centred over the n training rows. With `intercept`, each
    left-out fit re-estimates that mean, as scikit-learn's RidgeCV(fit_intercept=True,
    alpha_per_target=True) does on the uncentred data; without it, the data are taken as they are
    (RidgeCV(fit_intercept=False)).

    Primal (X, d < n): X = U S V^T; residual_i = (y - H y)_i / (1 - h_ii - 1/n), the 1/n being the
    mean's leverage. Dual (K): residual_i = c_i / G_ii with c = G Y and G the inverse of K + aI on
    the complement of the constant vector. Centred features put the constant vector in K's null
    space, where (K + aI)^-1 is 1/a: left in, it inflates G_ii as alpha -> 0 and makes the smallest
    alpha look best (the mean is unpenalized, so that direction does not belong to the ridge).
    Decompositions and diagonals are float64 (real trunks' features are ill conditioned), and so
    are the n x V products, except a primal's with fewer features than rows: float32 there equals
    scikit-learn to 2e-3 on ill-conditioned features and is the full NSD's (fast) path, while
    float32 put the kernel path's leave-one-out error 0.2% off at 40 images and 400 features.
    Cost per alpha: n d V (primal) or n^2 V (dual); targets go in blocks of `target_block`.
    """
    if (X is None) == (K is None):
        raise ValueError("give X (primal) or K (dual)")
    dev = Y.device
    n, v = Y.shape
    if X is not None:
        U, s, Vt = torch.linalg.svd(X.double(), full_matrices=False)
        ev = s * s
    else:
        K64 = K.double()
        if intercept:
            # Shifted far above the spectrum, the constant vector is eigh's last eigenvector; dropped.
            shift = 2 * float(K64.diagonal().sum()) + 1
            ev, U = torch.linalg.eigh(K64 + shift / n)
            ev, U = ev[:-1], U[:, :-1]
        else:
            ev, U = torch.linalg.eigh(K64)
        ev = ev.clamp_min(0)
    mean_leverage = 1.0 / n if intercept else 0.0
    U2 = U * U
    work = torch.float32 if X is not None and X.shape[1] < n else torch.float64
    Uw = U.to(work)
    best = torch.full((v,), math.inf, device=dev)
    best_alpha = torch.zeros(v, device=dev, dtype=torch.float64)
    coef = torch.empty(((Vt.shape[1] if X is not None else n), v), device=dev)
    errors = torch.empty(len(alphas), v, device=dev) if curve else None
    a = torch.as_tensor(alphas, device=dev, dtype=torch.float64)
    for sl in _target_blocks(v, target_block):
        y = Y[:, sl].to(work)
        R = Uw.T @ y
        b_err = torch.full((y.shape[1],), math.inf, device=dev)
        b_alpha = torch.zeros(y.shape[1], device=dev, dtype=torch.float64)
        for k, alpha in enumerate(a):
            if X is not None:  # residual (y - H y) / (1 - h_ii - 1/n)
                shrink = ev / (ev + alpha)
                resid = torch.sub(y, Uw @ (shrink.to(work)[:, None] * R))
                resid /= (1 - mean_leverage - U2 @ shrink).clamp_min(1e-12).to(work)[:, None]
            else:  # c_i / G_ii
                inv = 1 / (ev + alpha)
                resid = U @ (inv[:, None] * R)
                resid /= (U2 @ inv).clamp_min(1e-300)[:, None]
            err = resid.square_().mean(0).float()  # in place: one n x block buffer per alpha
            if errors is not None:
                errors[k, sl] = err
            better = err < b_err
            b_err = torch.where(better, err, b_err)
            b_alpha = torch.where(better, alpha, b_alpha)
        best[sl], best_alpha[sl] = b_err, b_alpha
        if X is not None:  # W = V diag(s / (s^2 + a_t)) R per target
            coef[:, sl] = (Vt.T @ (s[:, None] / (ev[:, None] + b_alpha[None, :]) * R.double())).float()
        else:  # c = U diag(1 / (l + a_t)) R per target
            coef[:, sl] = (U @ (R / (ev[:, None] + b_alpha[None, :]))).float()
    return LooResult(best_alpha.float(), best, coef, errors)


def banded_ridge(
    kernels: torch.Tensor, Y: torch.Tensor, alphas: np.ndarray, folds: list, n_iter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """himalaya's MultipleKernelRidgeCV on precomputed per-layer kernels (n_layers, n, n): per
    target a kernel weighting (random search over the simplex) and an alpha, by cross-validation
    over `folds`. Returns dual coefficients (n, V) and the per-target kernel weights (n_layers, V):
    prediction = sum_l weights_l * (K_l(new, train) @ dual), with the alpha absorbed in the weights
    (the effective alpha of a target is 1 / sum_l weights_l)."""
    from himalaya.backend import get_backend
    from himalaya.kernel_ridge import MultipleKernelRidgeCV

    backend = get_backend()
    model = MultipleKernelRidgeCV(
        kernels="precomputed",
        solver="random_search",
        solver_params=dict(n_iter=n_iter, alphas=alphas, progress_bar=False),
        cv=folds,
        random_state=seed,
    )
    model.fit(backend.asarray(kernels), backend.asarray(Y))
    deltas = torch.as_tensor(backend.to_numpy(model.deltas_), device=Y.device)  # log kernel weights
    dual = torch.as_tensor(backend.to_numpy(model.dual_coef_), device=Y.device)
    return dual, torch.exp(deltas)


def set_ridge_backend(device: torch.device) -> None:
    """himalaya's torch backend on the device's kind (torch_cuda on a GPU)."""
    from himalaya.backend import set_backend

    set_backend("torch_cuda" if device.type == "cuda" else "torch", on_error="warn")
