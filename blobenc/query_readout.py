"""The query-readout head (`head: query_readout`, issue #23; docs/fit-head.md, "The query-readout head").

Learned queries, one per group of targets, cross-attend over the tokens of every selected layer, as
the brain-region queries of Adeli et al. (Algonauts 2023, 2nd place):

    tokens   each layer's tokens (a CNN map's H*W positions) mapped to keys and values of width D
             (one linear map per layer to 2D, then a LayerNorm each); the keys also get the layer's
             learned embedding and a fixed sin-cos position code (2-D on a grid, in [0, 1)² whatever
             its resolution) through a learned linear map
    queries  Q learned vectors (+ a learned subject embedding, zero at the start); `depth` blocks of
             multi-head cross-attention (torch's scaled_dot_product_attention, in batch chunks of
             at most `max_scores` attention scores) and a feed-forward block, both residual
    readout  query q's output o_q (LayerNorm, feature dropout) -> a latent z_q = E_q C_q o_q
             in the group-PCA space, z = sum_q z_q + b_subject; the frozen embedding decodes z

Each target is assigned to one query (`assign`): with `regions` given (config `regions: rois`), one
query per ROI and hemisphere (data.base.group_regions), a target outside every ROI going to the
region whose targets' loadings on the leading PCA components are nearest its own; else k-means
(k = Q) on those loadings. E_q (P x r, frozen) holds the r latent directions most concentrated on
query q's targets: the leading eigenvectors of W_qᵀ W_q, W_q the embedding's rows of those
targets. So query q reads out to its own targets' part of the latent space, and its gradient is
the error there; training's loss is the same masked group-space MSE as the group-linear head's
(train/step.py EmbeddedTargets: missing targets enter neither loss nor gradient). The
assignment and E are buffers, saved in the checkpoints; the embedding comes from the run's PCA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from blobenc.errors import ConfigError
from blobenc.heads import register_head, token_shape, tokens

KMEANS_COMPONENTS = 32  # the leading PCA components the targets are clustered on
MAX_FREQUENCY = 32  # of the position codes: finer than a 28 x 28 map's grid


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """(n, dim) sin-cos codes of n positions spread over [0, 1) (the same frame at every resolution),
    at dim/2 frequencies from pi to MAX_FREQUENCY pi, geometrically spaced (dim even)."""
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    freq = math.pi * torch.exp(torch.linspace(0, math.log(MAX_FREQUENCY), dim // 2, dtype=torch.float64))
    angle = pos[:, None] * freq[None]
    return torch.cat([angle.sin(), angle.cos()], 1).float()


def position_code(layer_shape: Sequence[int], dim: int) -> torch.Tensor:
    """(L, dim) fixed position code of a layer's tokens, in the order `tokens` gives them: a CNN map
    (C, H, W) by its 2-D grid (rows then columns, half the channels each); ViT tokens (L, C) by a
    square grid after their prefix tokens (0 to 8 of them, coded zero) where L allows one, else 1-D."""
    if dim % 4:
        raise ConfigError(f"hidden_dim={dim}: the query-readout head needs a multiple of 4")
    if len(layer_shape) == 3:
        _, h, w = layer_shape
        prefix = 0
    else:
        n = int(layer_shape[0])
        prefix = next((p for p in range(9) if math.isqrt(n - p) ** 2 == n - p and n - p > 1), None)
        if prefix is None:
            return sincos_1d(n, dim)
        h = w = math.isqrt(n - prefix)
    rows = sincos_1d(h, dim // 2)[:, None, :].expand(h, w, dim // 2)
    cols = sincos_1d(w, dim // 2)[None, :, :].expand(h, w, dim // 2)
    grid = torch.cat([rows, cols], 2).reshape(h * w, dim)
    return torch.cat([torch.zeros(prefix, dim), grid])


class CrossBlock(nn.Module):
    """Queries (B, Q, D) attend over keys and values (B, heads, T, D/heads); then a feed-forward block."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, dim)
        self.wo = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_scores: int) -> torch.Tensor:
        qh = self.split(self.wq(self.norm_q(q)))
        rows = max(1, max_scores // (qh.shape[1] * qh.shape[2] * k.shape[2]))  # bounds B x heads x Q x T
        out = torch.cat(
            [
                F.scaled_dot_product_attention(qh[i : i + rows], k[i : i + rows], v[i : i + rows])
                for i in range(0, len(qh), rows)
            ]
        )
        q = q + self.drop(self.wo(out.transpose(1, 2).flatten(2)))
        return q + self.drop(self.ff(self.norm_ff(q)))

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, heads, Q, T) the attention weights `forward` applies, written out."""
        qh = self.split(self.wq(self.norm_q(q)))
        return torch.softmax(qh @ k.transpose(-1, -2) / math.sqrt(qh.shape[-1]), -1)


class QueryReadout(nn.Module):
    """Learned queries over the tokens of several layers, read out per query into the group-PCA
    latent space (the module docstring). `hidden_dim` is the width D, `dropout` the feature dropout
    of the queries' outputs (and of the attention and feed-forward blocks); `rank` r of each query's
    readout (None: 2P/Q, at least 4)."""

    def __init__(
        self,
        layer_shapes: Sequence[Sequence[int]],
        n_subjects: int,
        n_vertices: int,
        hidden_dim: int = 128,
        proj_dim: int = 2048,
        dropout: float = 0.1,
        queries: int = 32,
        depth: int = 1,
        heads: int = 4,
        rank: int | None = None,
        max_scores: int = 1 << 26,
    ):
        super().__init__()
        if hidden_dim % heads:
            raise ConfigError(f"hidden_dim={hidden_dim}: the query-readout head needs a multiple of heads={heads}")
        if queries > n_vertices:
            raise ConfigError(f"queries={queries}: more queries than the {n_vertices} targets")
        d, p = hidden_dim, proj_dim
        self.n_queries, self.heads, self.max_scores = queries, heads, max_scores
        self.rank = min(p, rank or max(4, math.ceil(2 * p / queries)))
        self.kv = nn.ModuleList(nn.Linear(token_shape(s)[1], 2 * d) for s in layer_shapes)
        self.norm_k = nn.ModuleList(nn.LayerNorm(d) for _ in layer_shapes)
        self.norm_v = nn.ModuleList(nn.LayerNorm(d) for _ in layer_shapes)
        self.layer_embed = nn.Parameter(torch.zeros(len(layer_shapes), d))
        self.pos_proj = nn.Linear(d, d)  # the fixed codes mixed, so that every attention head sees rows and columns
        for i, s in enumerate(layer_shapes):
            self.register_buffer(f"pos{i}", position_code(s, d), persistent=False)
        self.queries = nn.Parameter(torch.randn(queries, d) * 0.02)
        self.subject_embed = nn.Parameter(torch.zeros(n_subjects, d))
        self.blocks = nn.ModuleList(CrossBlock(d, heads, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.readout = nn.Parameter(torch.randn(queries, self.rank, d) * d**-0.5)  # C_q (r, D)
        self.n_subjects = n_subjects
        self.subject_bias = nn.Parameter(torch.zeros(n_subjects * p))  # flat: a bias, no weight decay
        self.embed = nn.Linear(p, n_vertices)
        self.embed.requires_grad_(False)
        # what the embedding fixes (set_embedding): each target's query, each query's directions
        self.register_buffer("assign", torch.zeros(n_vertices, dtype=torch.long))
        self.register_buffer("directions", torch.zeros(queries, p, self.rank))  # E_q (P, r)
        self.regions: torch.Tensor | None = None  # each target's region (-1: none), for set_embedding

    def set_regions(self, regions: torch.Tensor) -> None:
        """(V,) each target's region in [-1, Q) (one query per region; -1: outside every region),
        which set_embedding assigns the targets by instead of k-means."""
        regions = torch.as_tensor(regions, dtype=torch.long)
        if regions.shape != self.assign.shape or int(regions.max()) >= self.n_queries:
            raise ConfigError(f"regions: expected {len(self.assign)} labels below {self.n_queries}, one query a region")
        self.regions = regions

    def set_embedding(self, components: torch.Tensor, mean: torch.Tensor) -> None:
        """components (P, V), mean (V,) from the group PCA; assigns the targets to the queries and
        sets each query's readout directions from them."""
        with torch.no_grad():
            self.embed.weight.copy_(torch.as_tensor(components).T)
            self.embed.bias.copy_(torch.as_tensor(mean))
            w = self.embed.weight.detach().double().cpu()
            loadings = w[:, :KMEANS_COMPONENTS]
            if self.regions is None:
                assign = kmeans(loadings, self.n_queries)
            else:
                assign = nearest_region(loadings, self.regions, self.n_queries)
            self.assign.copy_(assign)
            self.directions.copy_(query_directions(w, assign, self.n_queries, self.rank))

    def embedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (V, P), c (V,)) with group-space prediction = W @ latent + c."""
        return self.embed.weight, self.embed.bias

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.embed(z)

    def keys_values(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, T, D/heads) of every layer's tokens, concatenated."""
        ks, vs = [], []
        for i, (kv, x) in enumerate(zip(self.kv, feats, strict=True)):
            k, v = kv(tokens(x)).chunk(2, -1)
            ks.append(self.norm_k[i](k) + self.pos_proj(getattr(self, f"pos{i}")) + self.layer_embed[i])
            vs.append(self.norm_v[i](v))
        k, v = torch.cat(ks, 1), torch.cat(vs, 1)
        return self.blocks[0].split(k), self.blocks[0].split(v)

    def outputs(self, feats: Sequence[torch.Tensor], subject: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) the queries' outputs."""
        k, v = self.keys_values(feats)
        q = self.queries[None] + self.subject_embed[subject][:, None]
        for block in self.blocks:
            q = block(q, k, v, self.max_scores)
        return self.drop(self.norm_out(q))

    def forward(self, feats: Sequence[torch.Tensor], subject: torch.Tensor, latent: bool = False) -> torch.Tensor:
        """Group-space predictions (B, V); with `latent`, the (B, P) vector the frozen embedding maps."""
        o = self.outputs(feats, subject)
        # z = sum_q E_q C_q o_q, as one (Q r)-wide map: (B, Q r) @ (Q r, P)
        c = torch.einsum("bqd,qrd->bqr", o, self.readout).flatten(1)
        z = c @ self.directions.transpose(1, 2).flatten(0, 1).to(c.dtype)
        z = z + self.subject_bias.view(self.n_subjects, -1)[subject].to(z.dtype)
        return z if latent else self.decode(z)

    @torch.no_grad()
    def attention(self, feats: Sequence[torch.Tensor], subject: torch.Tensor, block: int = -1) -> torch.Tensor:
        """(B, Q, T) each query's attention over the tokens of every layer (in order), averaged over heads,
        in `block` (default the last)."""
        k, v = self.keys_values(feats)
        q = self.queries[None] + self.subject_embed[subject][:, None]
        n = len(self.blocks) + block if block < 0 else block
        for b in self.blocks[:n]:
            q = b(q, k, v, self.max_scores)
        return self.blocks[n].scores(q, k).mean(1)


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """(N,) cluster of each row of x (N, d), rows scaled to unit norm: k-means++ seeded by `seed`, then
    Lloyd's iterations; an emptied cluster takes the row farthest from its centre."""
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    g = torch.Generator().manual_seed(seed)
    centres = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        i = torch.multinomial(d2.float() + 1e-12, 1, generator=g)
        centres.append(x[i].squeeze(0))
        d2 = torch.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        label = torch.cdist(x, c).argmin(1)
        dist = ((x - c[label]) ** 2).sum(1)
        for j in range(k):
            rows = label == j
            if rows.any():
                c[j] = x[rows].mean(0)
            else:
                far = dist.argmax()
                c[j], label[far], dist[far] = x[far], j, 0
    return torch.cdist(x, c).argmin(1)


def nearest_region(x: torch.Tensor, regions: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) the region of each row of x (N, d): its own where `regions` gives one (>= 0), else the
    region whose mean unit-norm row is nearest (as k-means assigns)."""
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labelled = regions >= 0
    centres = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, regions[labelled], x[labelled])
    centres /= torch.bincount(regions[labelled], minlength=k).clamp_min(1)[:, None].to(x.dtype)
    return torch.where(labelled, regions, torch.cdist(x, centres).argmin(1))


def query_directions(w: torch.Tensor, assign: torch.Tensor, n_queries: int, rank: int) -> torch.Tensor:
    """(Q, P, r): per query the r leading eigenvectors of W_qᵀ W_q (W_q: the rows of w (V, P) of the
    query's targets), the latent directions most concentrated on its targets; signs fixed (largest
    entry positive) so that every platform gives the same."""
    out = torch.zeros(n_queries, w.shape[1], rank, dtype=torch.float64)
    for q in range(n_queries):
        wq = w[assign == q]
        _, vecs = torch.linalg.eigh(wq.T @ wq)
        top = vecs[:, -rank:].flip(1)
        sign = torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
        out[q] = top * sign
    return out.float()


@register_head
def query_readout(*, queries: int = 32, depth: int = 1, **kwargs) -> QueryReadout:
    """Config keys `queries` and `depth` are its own (heads.head_options); the rest as fit-head builds heads."""
    return QueryReadout(queries=queries, depth=depth, **kwargs)
