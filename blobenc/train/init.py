"""Closed-form starts for the group-linear head (config key `init`).

`random`: the modules' own initialisation (the reference's).
`ridge`: the shared and subject maps are the ridge solutions from the head's initial hidden features
    to the training targets in PCA space, each penalty chosen on the validation split; batch norm
    starts from the training features' statistics. Training then starts where a linear read-out of
    the initial features ends.
`pca-ridge`: as `ridge`, the channel maps first set to the leading principal directions of the
    z-scored, position-averaged features of all layers (what the ridge stand-in regresses on).

Because the PCA embedding W is orthonormal, the masked group-space error of a latent z is
||z - r||² + const for a subject that has every group vertex (r = Wᵀ M (y - c), see
EmbeddedTargets), so ridge in the P latent dimensions is ridge on the group-space responses. The
few vertices a subject lacks are ignored here (the start only; training uses the exact loss).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from blobenc.heads import tokens
from blobenc.train.config import HeadConfig

logger = logging.getLogger(__name__)

PENALTIES = np.logspace(-2, 5, 15)  # ridge penalties tried, relative to the mean eigenvalue of HᵀH


@torch.no_grad()
def closed_form_start(models: list[tuple], data, batch_size: int, weight: torch.Tensor, bias: torch.Tensor) -> list:
    """Set the start of every (model, layer_idx, init) in `models` whose init is not `random`, from one
    pass over the training and one over the validation samples; `weight` (V, P) and `bias` (V,) are
    the frozen embedding. Returns per model what was chosen (penalties, validation loss), or None.

    Models that start identical (same architecture, init and random init: a sweep over lr, dropout or
    weight decay) share one computation: the first one's start is copied to the others."""
    for _, _, how in models:
        HeadConfig(init=how).check()  # an unknown init is refused with the valid ones
    todo, copies = [], {}  # copies: id(model) -> the model whose start it takes
    first_of: dict = {}
    for m, idx, how in models:
        if how == "random" or not hasattr(m, "feat_projs"):  # a head with no closed-form start: its own init
            continue
        key = (how, tuple(idx), _fingerprint(m))
        if key in first_of:
            copies[id(m)] = first_of[key]
        else:
            first_of[key] = m
            todo.append((m, idx, how))
            m.eval()
    if not todo:
        return [None for _ in models]
    if any(how == "pca-ridge" for _, _, how in todo):
        directions = _pooled_pca(data, batch_size)
        for m, idx, how in todo:
            if how == "pca-ridge":
                _set_channel_maps(m, [directions[i] for i in idx])
    n_train, n_val = len(data.sets["train"]), len(data.sets["val"])
    train = _hidden(todo, ((f, s, r) for f, s, r, _ in data.train_batches(batch_size, 0, 0, 1)), n_train, True)
    val = _hidden(todo, ((f, s, torch.as_tensor(i)) for i, f, s in data.val_batches(batch_size)), n_val, False)
    order = val["extra"].long()  # streamed validation batches come in cache order: back to sample order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    r_val = _latent_targets(data, weight, bias)
    chosen = {}
    for k, (m, _, _) in enumerate(todo):
        chosen[id(m)] = _fit_maps(
            m, train[k], val[k][inverse], train["subject"], val["subject"][inverse], train["extra"].double(), r_val
        )
    for m, _, _ in models:
        if id(m) in copies:
            m.load_state_dict(copies[id(m)].state_dict())
            m.eval()
            chosen[id(m)] = chosen[id(copies[id(m)])]
    return [chosen.get(id(m)) for m, _, _ in models]


def _fingerprint(model) -> tuple:
    """What makes two heads' starts equal: their parameter and buffer shapes and values."""
    return tuple((k, tuple(v.shape), hash(v.detach().cpu().numpy().tobytes())) for k, v in model.state_dict().items())


def _pooled_pca(data, batch_size: int) -> list[torch.Tensor]:
    """Per layer (C_i, n) channel directions: the leading principal components of the z-scored,
    position-averaged features of all layers together, split by layer, in raw feature units."""
    x, sizes, pos = None, [], 0
    for feats, *_ in data.train_batches(batch_size, 0, 0, 1):
        pooled = torch.cat([tokens(f).mean(1) for f in feats], 1).double()
        if x is None:  # allocated once (see _hidden)
            x, sizes = pooled.new_empty(len(data.sets["train"]), pooled.shape[1]), [tokens(f).shape[-1] for f in feats]
        x[pos : pos + len(pooled)] = pooled
        pos += len(pooled)
    x = x[:pos]
    std = x.std(0).clamp_min(1e-6)
    _, _, vt = torch.linalg.svd((x - x.mean(0)) / std, full_matrices=False)  # rows: directions, by variance
    return list(torch.split((vt / std).T, sizes, dim=0))


def _set_channel_maps(model, directions: list[torch.Tensor]) -> None:
    """weight2 rows of each layer := the leading directions, unit norm (the random rows' scale);
    rows beyond the number of directions keep their random start."""
    for proj, d in zip(model.feat_projs, directions, strict=True):
        w2 = proj.proj.weight2
        n = min(w2.shape[0], d.shape[1])
        rows = d[:, :n].T
        w2[:n] = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).to(w2)


def _hidden(todo, batches, n: int, set_norm: bool) -> dict:
    """Each model's hidden features (N, K) in eval mode, float64, of the `n` samples `batches`
    yields as (features, subject, extra); with `set_norm` batch norm first takes these samples'
    statistics. Holds N x K x layers float32 per model, allocated before the first batch: growing
    lists between each batch's large temporaries fragmented the heap by gigabytes at the full NSD."""
    out: dict = {"subject": None, "extra": None}
    projected = {k: [None] * len(m.feat_projs) for k, (m, _, _) in enumerate(todo)}
    pos = 0
    for feats, subject, extra in batches:
        if out["subject"] is None:
            out["subject"] = subject.new_empty(n)
            out["extra"] = extra.new_empty(n, *extra.shape[1:]).to(subject.device)
        rows = slice(pos, pos + len(subject))
        out["subject"][rows], out["extra"][rows] = subject, extra
        for k, (m, idx, _) in enumerate(todo):
            for j, (fp, i) in enumerate(zip(m.feat_projs, idx, strict=True)):
                p = fp.proj(tokens(feats[i]))
                if projected[k][j] is None:
                    projected[k][j] = p.new_empty(n, p.shape[1])
                projected[k][j][rows] = p
        pos += len(subject)
    if pos != n:
        raise RuntimeError(f"closed-form start: {pos} samples came, {n} expected")
    for k, (m, _, _) in enumerate(todo):
        h = torch.zeros(n, projected[k][0].shape[1], dtype=torch.float64, device=projected[k][0].device)
        for fp, p in zip(m.feat_projs, projected[k], strict=True):
            if set_norm:
                fp.norm.running_mean.copy_(p.mean(0))
                fp.norm.running_var.copy_(p.var(0))
            h += fp.norm(p).double()
        projected[k] = None
        out[k] = h / len(m.feat_projs)
    return out


def _latent_targets(data, weight: torch.Tensor, bias: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """(N_val, P) r = Wᵀ M (y - c) of the validation samples, in sample order; by blocks of rows
    (float64 copies of all of them were 3 x 2.5 GB at the full NSD's 7,840 x 39,548)."""
    w, c = weight.detach().double(), bias.detach().double()
    n = len(data.val_target)
    out = torch.empty(n, w.shape[1], dtype=torch.float64, device=w.device)
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        y = torch.as_tensor(data.val_target[rows], device=w.device).double()
        observed = torch.as_tensor(data.observed("val", rows), device=w.device)
        out[start : start + len(rows)] = ((y - c) * observed) @ w
    return out


def _ridge_path(h: torch.Tensor, y: torch.Tensor):
    """(penalty, map (out, K)) from h (N, K) to y (N, out) for each of PENALTIES, by one SVD;
    penalties relative to the mean squared singular value."""
    u, s, vt = torch.linalg.svd(h, full_matrices=False)
    uy = u.T @ y
    scale = float((s**2).mean())
    for lam in PENALTIES:
        yield float(lam), (vt.T @ ((s / (s**2 + lam * scale))[:, None] * uy)).T


def _fit_maps(model, h: torch.Tensor, h_val: torch.Tensor, s_train, s_val, r: torch.Tensor, r_val) -> dict:
    """z = (B + W_i)(h - mean_h_i) + mean_r_i for subject i: the shared map B by ridge on the
    subject-centred samples, then each subject's W_i by ridge on its residuals; each penalty the one
    with the lowest validation loss. Writes shared_proj and subj_proj (weights and biases)."""
    present = [i for i in range(model.subj_proj.n_subjects) if (s_train == i).any()]
    mean_h = {i: h[s_train == i].mean(0) for i in present}
    mean_r = {i: r[s_train == i].mean(0) for i in present}
    hc, rc = h.clone(), r.clone()
    for i in present:
        hc[s_train == i] -= mean_h[i]
        rc[s_train == i] -= mean_r[i]

    def loss(maps: dict, subjects) -> float:
        """Validation sum of squared latent errors over these subjects' samples."""
        total = 0.0
        for i in subjects:
            rows = s_val == i
            if rows.any() and i in mean_h:
                z = (h_val[rows] - mean_h[i]) @ maps[i].T + mean_r[i]
                total += float(((z - r_val[rows]) ** 2).sum())
        return total

    n_val = max(len(s_val), 1)
    shared_lam, shared = min(_ridge_path(hc, rc), key=lambda lb: loss(dict.fromkeys(present, lb[1]), present))
    shared_loss = loss(dict.fromkeys(present, shared), present) / n_val
    maps, lams = {}, {}
    for i in present:
        rows = s_train == i
        path = list(_ridge_path(hc[rows], rc[rows] - hc[rows] @ shared.T))
        lams[i], w_i = min(path, key=lambda lb, i=i: loss({i: shared + lb[1]}, [i]))
        maps[i] = shared + w_i
    total = loss(maps, present) / n_val
    p = shared.shape[0]
    model.shared_proj.weight.copy_(shared.to(model.shared_proj.weight))
    weight = model.subj_proj.fc.weight.view(model.subj_proj.n_subjects, p, -1)
    bias = model.subj_proj.fc.bias.view(model.subj_proj.n_subjects, p)
    for i in range(model.subj_proj.n_subjects):
        if i in maps:
            weight[i] = (maps[i] - shared).to(weight)
            bias[i] = (mean_r[i] - maps[i] @ mean_h[i]).to(bias)
        else:  # a subject with no training sample: the shared map alone
            weight[i], bias[i] = 0, 0
    logger.info(
        "closed-form start: shared penalty %.3g, validation loss %.4g (shared map only %.4g)",
        shared_lam,
        total,
        shared_loss,
    )
    return {"shared_penalty": shared_lam, "subject_penalties": lams, "val_loss": total, "shared_val_loss": shared_loss}
