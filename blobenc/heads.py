"""Encoding heads and their registry.

The group-linear encoder (docs/model.md, "The model"), with the reference release's
parameter names so its checkpoints load as they are:

    feat_projs.{i}.proj.weight2 (K, C)   channel map of layer i
    feat_projs.{i}.proj.weight1 (K, L)   per-output-channel weights over positions
    feat_projs.{i}.norm.*                BatchNorm1d(K)
    shared_proj.weight (P, K)            shared low-dimensional map
    subj_proj.fc.weight (S*P, K), .bias  one P x K map (+ bias) per subject
    embed.weight (V, P), embed.bias (V,) frozen group PCA: components.T and mean
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from blobenc.errors import ConfigError

_HEADS: dict[str, Callable[..., nn.Module]] = {}


def register_head(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _HEADS[fn.__name__] = fn
    return fn


def list_heads() -> list[str]:
    return sorted(_HEADS)


def create_head(name: str, **kwargs) -> nn.Module:
    if name not in _HEADS:
        raise ConfigError(f"head {name!r} is not registered; valid: {', '.join(list_heads())}")
    return _HEADS[name](**kwargs)


def head_options(name: str, config: dict) -> dict:
    """The entries of `config` (a head config's keys) that head `name` takes as its own construction
    arguments, by the names its factory declares (e.g. query_readout's `queries`, `depth`)."""
    if name not in _HEADS:
        raise ConfigError(f"head {name!r} is not registered; valid: {', '.join(list_heads())}")
    params = inspect.signature(_HEADS[name]).parameters
    return {k: v for k, v in config.items() if k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY}


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, L, C) tokens as they are; (B, C, H, W) maps as (B, H*W, C)."""
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    if x.ndim != 3:
        raise ConfigError(f"head inputs must be (B, L, C) tokens or (B, C, H, W) maps, got {tuple(x.shape)}")
    return x


def token_shape(layer_shape: Sequence[int]) -> tuple[int, int]:
    """(L, C) a layer's per-image shape becomes: ViT (L, C) as is, CNN (C, H, W) as (H*W, C)."""
    if len(layer_shape) == 3:
        c, h, w = layer_shape
        return h * w, c
    if len(layer_shape) == 2:
        return int(layer_shape[0]), int(layer_shape[1])
    raise ConfigError(f"layer shape {tuple(layer_shape)}: expected (L, C) or (C, H, W)")


class FactorizedLinear(nn.Module):
    """y[b, k] = sum_l weight1[k, l] * sum_c weight2[k, c] * x[b, l, c]: a rank-one (positions x
    channels) dense map per output channel, at a fraction of the parameters."""

    def __init__(self, n_tokens: int, in_channels: int, out_channels: int):
        super().__init__()
        self.weight1 = nn.Parameter(torch.full((out_channels, n_tokens), 1.0 / n_tokens))
        self.weight2 = nn.Parameter(torch.empty(out_channels, in_channels))
        nn.init.trunc_normal_(self.weight2, std=in_channels**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x @ self.weight2.T  # (B, L, K)
        return (t * self.weight1.T).sum(1)


class FeatureProjection(nn.Module):
    def __init__(self, n_tokens: int, in_channels: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.proj = FactorizedLinear(n_tokens, in_channels, hidden_dim)
        self.norm = nn.BatchNorm1d(hidden_dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.proj(tokens(x))))


def by_subject(
    x: torch.Tensor, subject: torch.Tensor, fn: Callable[[int, torch.Tensor], torch.Tensor], out_dim: int
) -> torch.Tensor:
    """(B, out_dim): fn(s, x[subject == s]) for each subject s in the batch, in batch order."""
    out = x.new_zeros(len(x), out_dim)
    for s in torch.unique(subject).tolist():
        sel = (subject == s).nonzero().squeeze(1)
        out = out.index_copy(0, sel, fn(s, x[sel]).to(out.dtype))
    return out


class SubjectLinear(nn.Module):
    """One (P x K) map with bias per subject, stored stacked as the reference does."""

    def __init__(self, in_dim: int, out_dim: int, n_subjects: int):
        super().__init__()
        self.out_dim, self.n_subjects = out_dim, n_subjects
        self.fc = nn.Linear(in_dim, n_subjects * out_dim)

    def forward(self, h: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
        # One matmul per subject present: gathering a (P, K) map per sample would copy B x P x K
        # (4 GB at the reference batch 512, P 2048, K 1024) and was 7x slower on CPU.
        w = self.fc.weight.view(self.n_subjects, self.out_dim, -1)
        b = self.fc.bias.view(self.n_subjects, self.out_dim)
        return by_subject(h, subject, lambda s, x: F.linear(x, w[s], b[s]), self.out_dim)


class GroupLinearEncoder(nn.Module):
    """Multi-subject encoder: per-layer factorized projections averaged, shared + subject maps,
    then the frozen group-PCA embedding back to group vertex space."""

    def __init__(
        self,
        layer_shapes: Sequence[Sequence[int]],
        n_subjects: int,
        n_vertices: int,
        hidden_dim: int = 1024,
        proj_dim: int = 2048,
        dropout: float = 0.9,
        reference_bias_twice: bool = False,
    ):
        super().__init__()
        self.feat_projs = nn.ModuleList(FeatureProjection(*token_shape(s), hidden_dim, dropout) for s in layer_shapes)
        self.shared_proj = nn.Linear(hidden_dim, proj_dim, bias=False)
        self.subj_proj = SubjectLinear(hidden_dim, proj_dim, n_subjects)
        self.embed = nn.Linear(proj_dim, n_vertices)
        self.embed.requires_grad_(False)
        # The reference computes embed(shared(h)) + embed(subj(h)): the PCA mean counted twice.
        self.reference_bias_twice = reference_bias_twice

    def set_embedding(self, components: torch.Tensor, mean: torch.Tensor) -> None:
        """components (P, V), mean (V,) from the group PCA."""
        with torch.no_grad():
            self.embed.weight.copy_(torch.as_tensor(components).T)
            self.embed.bias.copy_(torch.as_tensor(mean))

    def hidden(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([proj(f) for proj, f in zip(self.feat_projs, feats, strict=True)]).mean(0)

    def embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (V, P), c (V,)) with group-space prediction = W @ latent + c: what training's loss needs."""
        bias = self.embed.bias * 2 if self.reference_bias_twice else self.embed.bias
        return self.embed.weight, bias

    def forward(self, feats: Sequence[torch.Tensor], subject: torch.Tensor, latent: bool = False) -> torch.Tensor:
        """Group-space predictions (B, V); with `latent`, the (B, P) vector the frozen embedding maps."""
        h = self.hidden(feats)
        z = self.shared_proj(h) + self.subj_proj(h, subject)
        return z if latent else self.decode(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Group-space predictions (B, V) of latents z (B, P): the frozen embedding."""
        out = self.embed(z)
        return out + self.embed.bias if self.reference_bias_twice else out


class HeadEnsemble(nn.Module):
    """Heads that share one frozen embedding (members of one run), averaged: the mean of their
    latents, embedded once, which is the mean of their predictions since the embedding is linear.
    Member m reads the inputs at `layer_idx[m]`."""

    def __init__(self, members: Sequence[GroupLinearEncoder], layer_idx: Sequence[Sequence[int]]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.layer_idx = [list(i) for i in layer_idx]

    def forward(self, feats: Sequence[torch.Tensor], subject: torch.Tensor, latent: bool = False) -> torch.Tensor:
        z = torch.stack(
            [
                m([feats[i] for i in idx], subject, latent=True)
                for m, idx in zip(self.members, self.layer_idx, strict=True)
            ]
        ).mean(0)
        return z if latent else self.members[0].decode(z)


@register_head
def group_linear(**kwargs) -> GroupLinearEncoder:
    return GroupLinearEncoder(**kwargs)


from blobenc import query_readout as _query_readout  # noqa: E402, F401  (registers `query_readout`)
