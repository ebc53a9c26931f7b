"""The query-readout head (blobenc/query_readout.py): shapes, positions, masking, attention that finds
its region, and everything fit-head does with a head (sweeps, resume, predict, ensembles, finetune)."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import assert_same_weights, cfg
from safetensors.torch import load_file

from blobenc import ConfigError
from blobenc.heads import head_options, list_heads
from blobenc.query_readout import QueryReadout, sincos_1d
from blobenc.train.config import HEAD_DEFAULTS, load_config, sweep_configs
from blobenc.train.fit import fit_head
from blobenc.train.step import EmbeddedTargets, embedded_mse


def qcfg(**kw):
    return cfg(**({"head": "query_readout", "queries": 4, "init": "random"} | kw))


def head(layer_shapes, n_vertices=60, p=12, queries=3, **kw):
    torch.manual_seed(0)
    m = QueryReadout(layer_shapes, n_subjects=3, n_vertices=n_vertices, hidden_dim=16, proj_dim=p, dropout=0.0,
                     queries=queries, **kw)  # fmt: skip
    w = torch.linalg.qr(torch.randn(n_vertices, p, dtype=torch.float64))[0].float()
    m.set_embedding(w.T, torch.randn(n_vertices))
    return m


def test_registry_options_and_shapes():
    assert list_heads() == ["group_linear", "query_readout"]
    assert head_options("query_readout", {"queries": 8, "depth": 2, "lr": 1.0}) == {"queries": 8, "depth": 2}
    assert head_options("group_linear", {"queries": 8}) == {}
    assert load_config(overrides=["head=query_readout", "queries=16", "depth=2"]).queries == 16
    # the head's measured defaults where they differ from the group-linear head's; --set stands
    own = load_config(overrides=["head=query_readout", "lr=5e-4"])
    assert (own.hidden_dim, own.dropout, own.lr) == (HEAD_DEFAULTS["query_readout"]["hidden_dim"], 0.0, 5e-4)
    assert load_config().hidden_dim == 256
    with pytest.raises(ConfigError, match="queries=0: expected a positive value"):
        load_config(overrides=["queries=0"])
    m = head([(5, 4, 4), (17, 8)], depth=2)
    feats, subject = [torch.randn(7, 5, 4, 4), torch.randn(7, 17, 8)], torch.tensor([0, 1, 2, 0, 1, 2, 0])
    assert m(feats, subject).shape == (7, 60) and m(feats, subject, latent=True).shape == (7, 12)
    torch.testing.assert_close(m(feats, subject), m.decode(m(feats, subject, latent=True)))
    assert m.attention(feats, subject).shape == (7, 3, 16 + 17)
    assert sorted(m.assign.unique().tolist()) == [0, 1, 2]  # every query has targets
    # each query's directions: orthonormal, and those of the latent space most concentrated on its targets
    w = m.embed.weight.double()
    for q in range(3):
        e = m.directions[q].double()
        torch.testing.assert_close(e.T @ e, torch.eye(m.rank, dtype=torch.float64), atol=1e-5, rtol=0)
        share = ((w[m.assign == q] @ e) ** 2).sum(0)  # energy on the query's targets, per direction
        others = torch.linalg.eigvalsh(w[m.assign == q].T @ w[m.assign == q])
        torch.testing.assert_close(share, others.flip(0)[: m.rank], atol=1e-5, rtol=1e-5)


def test_cnn_map_attention_equals_the_same_computation_on_flattened_positions():
    c, h, w = 6, 3, 5
    m = head([(c, h, w)], queries=2)
    x, subject = torch.randn(4, c, h, w), torch.tensor([0, 2, 1, 0])
    # written out: tokens position-major (row h, column w), keys with a sin-cos code of row and column
    t = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
    k, v = m.kv[0](t).chunk(2, -1)
    rows = sincos_1d(h, 8).repeat_interleave(w, 0)
    cols = sincos_1d(w, 8).repeat(h, 1)
    k = m.norm_k[0](k) + m.pos_proj(torch.cat([rows, cols], 1)) + m.layer_embed[0]
    v = m.norm_v[0](v)
    blk = m.blocks[0]
    q = m.queries[None] + m.subject_embed[subject][:, None]
    qh = blk.wq(blk.norm_q(q)).view(4, 2, 4, 4).transpose(1, 2)
    kh, vh = (a.view(4, h * w, 4, 4).transpose(1, 2) for a in (k, v))
    attn = torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, -1)  # (B, heads, Q, T); head dim 4
    torch.testing.assert_close(m.attention([x], subject), attn.mean(1))
    q = q + blk.wo((attn @ vh).transpose(1, 2).flatten(2))
    q = q + blk.ff(blk.norm_ff(q))
    o = m.norm_out(q)
    z = sum(m.directions[j] @ (m.readout[j] @ o[:, j].T) for j in range(2)).T + m.subject_bias.view(3, -1)[subject]
    torch.testing.assert_close(m([x], subject, latent=True), z)
    # the same weights reading (H*W, C) tokens on a square grid: the same code, the same output
    sq = head([(c, 4, 4)], queries=2)
    flat = QueryReadout([(16, c)], n_subjects=3, n_vertices=60, hidden_dim=16, proj_dim=12, dropout=0.0, queries=2)
    flat.load_state_dict(sq.state_dict())
    y = torch.randn(4, c, 4, 4)
    torch.testing.assert_close(sq([y], subject), flat([y.flatten(2).transpose(1, 2)], subject))


def test_attention_in_chunks_equals_attention_at_once():
    m = head([(5, 4, 4), (9, 8)])
    feats, subject = [torch.randn(9, 5, 4, 4), torch.randn(9, 9, 8)], torch.arange(9) % 3
    chunked = head([(5, 4, 4), (9, 8)], max_scores=4 * 3 * 25 * 2)  # two samples per chunk
    torch.testing.assert_close(m(feats, subject), chunked(feats, subject))


def test_missing_targets_never_train():
    """A subject's missing targets enter neither the loss nor any gradient, whatever their values."""
    torch.manual_seed(1)
    m = head([(5, 4, 4)], n_vertices=40, p=8)
    masks = torch.ones(3, 40)
    masks[1, 5:20] = 0
    feats, subject = [torch.randn(6, 5, 4, 4)], torch.tensor([0, 1, 1, 2, 1, 0])
    weight, bias = m.embedding()

    def grads(target):
        y = (target - bias) * masks[subject]
        gram = torch.stack([weight.T @ (weight * mk[:, None]) for mk in masks])
        targets = EmbeddedTargets(y @ weight, (y * y).sum(1), gram, masks.sum(1))
        m.zero_grad()
        loss = embedded_mse(m(feats, subject, latent=True), subject, targets.r, targets.q, targets)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    target = torch.randn(6, 40)
    loss, g = grads(target)
    garbage = target.clone()
    garbage[subject == 1, 5:20] = 1e6
    loss2, g2 = grads(garbage)
    assert loss2 == pytest.approx(loss, rel=1e-5)
    for name in g:
        torch.testing.assert_close(g[name], g2[name], rtol=1e-4, atol=1e-6)
    assert g["readout"].abs().sum() > 0 and not g["embed.weight" if "embed.weight" in g else "readout"].isnan().any()
    assert "embed.weight" not in g  # the embedding is frozen
    # a subject with no sample in the batch: its subject parameters get no gradient
    subject = torch.tensor([0, 1, 1, 0, 1, 0])
    _, g = grads(target)
    assert g["subject_bias"].view(3, -1)[2].abs().sum() == 0 and g["subject_embed"][2].abs().sum() == 0


def test_each_query_attends_where_its_targets_read_the_image():
    """Two groups of targets, each a function of one quadrant of a CNN map; each group's query
    learns to attend to its quadrant, not to the other's."""
    torch.manual_seed(0)
    n, c, s, v = 256, 4, 6, 40
    x = torch.randn(n, c, s, s)
    loading = torch.randn(v, 2) * 0.3 + 1
    a = x[:, 0, :3, :3].mean((1, 2)) * 3  # top left
    b = x[:, 1, 3:, 3:].mean((1, 2)) * 3  # bottom right
    y = torch.cat([a[:, None] * loading[:20, :1].T, b[:, None] * loading[20:, 1:].T], 1)
    # an embedding whose first two components are the two groups' patterns: k-means separates them
    w = torch.zeros(v, 4)
    w[:20, 0], w[20:, 1] = loading[:20, 0], loading[20:, 1]
    w[:, 2:] = torch.randn(v, 2) * 0.01
    w = torch.linalg.qr(w)[0]
    m = QueryReadout([(c, s, s)], n_subjects=1, n_vertices=v, hidden_dim=16, proj_dim=4, dropout=0.0, queries=2,
                     rank=1)  # fmt: skip
    m.set_embedding(w.T, torch.zeros(v))
    qa, qb = int(m.assign[0]), int(m.assign[20])
    assert (m.assign[:20] == qa).all() and (m.assign[20:] == qb).all() and qa != qb
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    subject = torch.zeros(64, dtype=torch.long)
    for _ in range(200):
        rows = torch.randint(0, n, (64,))
        loss = ((m([x[rows]], subject) - y[rows]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * y.var().item()
    attn = m.attention([x[:64]], subject).mean(0).view(2, s, s)  # (Q, H, W); uniform: 1/4 a quadrant
    top_left, bottom_right = attn[:, :3, :3].sum((1, 2)), attn[:, 3:, 3:].sum((1, 2))
    assert top_left[qa] > 0.6 and bottom_right[qb] > 0.6, attn
    assert top_left[qb] < 0.15 and bottom_right[qa] < 0.15, attn


def test_sweep_trial_equals_the_same_config_alone(small_cache, train_data, tmp_path):
    grid = sweep_configs(qcfg(epochs=2), ["lr=1e-3,3e-3", "queries=2,4"])
    summary = fit_head(small_cache, train_data, tmp_path / "sweep", grid, progress=False)
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(sweep["trials"]) == 4 and summary["trial"] == sweep["best"]
    solo = fit_head(small_cache, train_data, tmp_path / "solo", [grid[3]], progress=False)
    a = load_file(tmp_path / "sweep" / "trial-03" / "last.safetensors")
    b = load_file(tmp_path / "solo" / "last.safetensors")
    assert set(a) == set(b) and not any(k.startswith("embed.") for k in a)  # lean: the PCA file holds it
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    row = next(t for t in sweep["trials"] if t["dir"] == "trial-03")
    assert row["median_r2"] == pytest.approx(solo["trials"][0]["median_r2"], abs=1e-6)
    spec = json.loads((tmp_path / "solo" / "model.json").read_text())
    assert spec["head"] == "query_readout" and spec["kwargs"]["queries"] == 4 and spec["kwargs"]["depth"] == 1
    import blobenc

    with pytest.raises(ConfigError, match="a trial of the sweep .*combine the sweep folder"):
        blobenc.predict([tmp_path / "sweep" / "trial-00", tmp_path / "solo"], train_data, tmp_path / "p",
                        progress=False)  # fmt: skip


def test_resume_after_ctrl_c_equals_uninterrupted_and_predict_rebuilds_it(small_cache, train_data, tmp_path):
    from test_trainer import InterruptAt

    from blobenc.predictions import predict
    from blobenc.run import load_run

    config = [qcfg(epochs=3)]
    fit_head(small_cache, train_data, tmp_path / "whole", config, progress=False)
    with pytest.raises(KeyboardInterrupt):
        fit_head(small_cache, train_data, tmp_path / "cut", config, checkpoint_minutes=60, progress=False,
                 callbacks=[InterruptAt(8)])  # fmt: skip
    fit_head(small_cache, train_data, tmp_path / "cut", config, resume=True, progress=False)
    for name in ("last.safetensors", "best.safetensors"):
        assert_same_weights(tmp_path / "whole" / name, tmp_path / "cut" / name)
    # predict rebuilds the head from the run folder: the same group-space predictions as in training
    enc = load_run(tmp_path / "whole")
    assert isinstance(enc.module, QueryReadout)
    predict(tmp_path / "whole", train_data, tmp_path / "pred", "subj02", device="cpu", progress=False)
    pred = np.load(tmp_path / "pred" / "subj02" / "lh_pred_test.npy")
    assert pred.shape[0] == 10 and np.isfinite(pred).all() and pred.std() > 0


def test_ensemble_and_finetune_from_a_query_readout_run(small_cache, train_data, tmp_path):
    from blobenc.heads import HeadEnsemble
    from blobenc.run import load_run
    from blobenc.train.config import FinetuneConfig
    from blobenc.train.finetune import finetune

    fit_head(small_cache, train_data, tmp_path / "e", [qcfg(epochs=1)], ensemble=2, progress=False)
    model = load_run(tmp_path / "e").module
    assert isinstance(model, HeadEnsemble) and all(isinstance(m, QueryReadout) for m in model.members)
    ft = FinetuneConfig(epochs=1, batch_size=32, lr=1e-3, num_workers=0)
    summary = finetune(tmp_path / "e" / "trial-00", train_data, tmp_path / "ft", ft, progress=False)
    assert math.isfinite(summary["trials"][0]["median_r2"])
    before = load_file(tmp_path / "e" / "trial-00" / "best.safetensors")
    after = load_file(tmp_path / "ft" / "last.safetensors")
    torch.testing.assert_close(after["head.directions"], before["directions"])  # buffers kept
    assert not torch.equal(after["head.readout"], before["readout"])


def test_roi_queries_one_per_roi_and_hemisphere_and_predict_rebuilds_them(small_cache, train_data, tmp_path):
    from blobenc.data import open_dataset
    from blobenc.data.base import group_regions
    from blobenc.predictions import predict

    labels, names = group_regions(open_dataset(train_data))
    # the finest group first: V1-V3 cover the early stream, which so never becomes a query
    assert {"lh.V1v", "rh.hV4", "lh.FFA-1"} <= set(names) and "lh.early" not in names
    assert names == sorted(set(names), key=names.index) and labels.max() == len(names) - 1
    fit_head(small_cache, train_data, tmp_path / "roi", [qcfg(epochs=1, regions="rois")], progress=False)
    spec = json.loads((tmp_path / "roi" / "model.json").read_text())
    assert spec["kwargs"]["queries"] == len(names)
    assign = load_file(tmp_path / "roi" / "best.safetensors")["assign"].numpy()
    labelled = labels >= 0
    assert (assign[labelled] == labels[labelled]).all() and assign.min() >= 0
    predict(tmp_path / "roi", train_data, tmp_path / "pred", "subj01", device="cpu", progress=False)
    assert np.isfinite(np.load(tmp_path / "pred" / "subj01" / "rh_pred_test.npy")).all()


def test_roi_queries_need_roi_labels(small_cache, train_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    for labels in data.glob("subj*/roi_masks/*_challenge_space.npy"):
        labels.unlink()
    with pytest.raises(ConfigError, match="regions=rois: .* has no ROI labels"):
        fit_head(small_cache, data, tmp_path / "run", [qcfg(epochs=1, regions="rois")], progress=False)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # refused before any work
    with pytest.raises(ConfigError, match="regions='x'"):
        qcfg(regions="x").check()
