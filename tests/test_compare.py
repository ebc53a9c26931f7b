"""compare: per-layer scores equal fit-ridge's, the best-layer table finds where the signal is,
variance partitioning recovers unique and shared parts, resume and shards equal one run."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file
from typer.testing import CliRunner

from blobenc.cli import app
from blobenc.compare import CompareConfig, partition_r2
from blobenc.compare_tables import vertex_maps
from blobenc.data import open_dataset
from blobenc.features.cache import FeatureCache
from blobenc.ridge import LayerScaler, reduce_layer, set_ridge_backend

runner = CliRunner()
TABLES = ("scores.csv", "leaderboard.csv", "best_layers.csv", "best_models.csv")


def _compare(caches, data, out, *args):
    res = runner.invoke(app, ["compare", *map(str, caches), "--data", str(data), "--out", str(out), "-q", *args])
    assert res.exit_code == 0, res.output
    return res


def _tables(out):
    return {name: pd.read_csv(out / name) for name in TABLES if (out / name).is_file()}


def test_layer_score_equals_fit_ridge_on_that_layer(small_cache, train_data, tmp_path):
    cmp = tmp_path / "cmp"
    _compare([small_cache], train_data, cmp)
    for layers, unit in ((["--layers", "blocks.1"], "blocks.1"), ([], "all-layers")):
        run = tmp_path / f"ridge-{unit}"
        args = ["fit-ridge", str(small_cache), "--data", str(train_data), "--out", str(run), "--no-refit", "-q"]
        assert runner.invoke(app, args + layers).exit_code == 0
        ref = load_file(run / "val_vertex.safetensors")
        for subject in ("subj01", "subj03"):
            got = load_file(cmp / "units" / "cache" / unit / f"{subject}.safetensors")
            np.testing.assert_allclose(got["val_r2"], ref[f"{subject}.r2"], atol=2e-4)
            np.testing.assert_allclose(got["val_r"], ref[f"{subject}.r"], atol=2e-4)
            assert "test_score" in got and got["test_r"].shape == got["val_r2"].shape
    summary = json.loads((cmp / "summary.json").read_text())
    assert [r["layer"] for r in summary["overall"]] == ["blocks.1", "blocks.3", "all-layers"]
    board = pd.read_csv(cmp / "leaderboard.csv")
    assert set(board.columns) >= {"model", "layer", "depth", "group", "roi", "val_r2", "test_score"}
    assert set(board.group) == {"all", "prf-visualrois", "floc-bodies", "floc-faces", "floc-places", "floc-words",
                                "streams"}  # fmt: skip
    assert board.query("layer == 'blocks.3'").depth.eq(1.0).all()


def _layer_features(cache, layer, keys):
    c = FeatureCache.open(cache)
    rows = c.rows(keys)
    out = torch.empty(len(rows), 64)
    for pos, block in c.read_rows(layer, rows, view=0):
        out[pos] = reduce_layer(block, "mean", int(c.attrs.get("num_prefix_tokens") or 0))
    return out.double().numpy()


@pytest.fixture(scope="module")
def layered_data(small_cache, train_data, tmp_path_factory):
    """train_data with responses rewritten: early visual ROIs (prf-visualrois) a linear function of
    blocks.1's features, every other vertex of blocks.3's, plus a little noise: along the 4
    directions of each layer's features with the most variance the other layer's span leaves out
    (the two share a residual stream)."""
    root = tmp_path_factory.mktemp("layered") / "data"
    shutil.copytree(train_data, root)
    ds = open_dataset(root)
    keys = sorted({k for s in ds.subjects.values() for split in ("train", "test") for k in s.keys[split]})
    raw = {layer: _layer_features(small_cache, layer, keys) for layer in ("blocks.1", "blocks.3")}
    raw = {layer: f - f.mean(0) for layer, f in raw.items()}
    feats = {}
    for layer, other in (("blocks.1", "blocks.3"), ("blocks.3", "blocks.1")):
        x = raw[layer] / raw[layer].std(0)
        q = np.linalg.svd(raw[other], full_matrices=False)[0]
        rest = x - q @ (q.T @ x)  # what the other layer's span leaves of this layer's features
        f = x @ np.linalg.eigh(rest.T @ rest)[1][:, -4:]
        feats[layer] = dict(zip(keys, f / f.std(0), strict=True))
    rng = np.random.default_rng(0)
    for name, subject in ds.subjects.items():
        early = subject.rois()["prf-visualrois"][0] > 0
        w = {layer: rng.standard_normal((4, subject.n_targets)) / 2 for layer in feats}
        for split, folder in (("train", "training_split/training_fmri"), ("test", "test_split/test_fmri")):
            x = {layer: np.stack([feats[layer][k] for k in subject.keys[split]]) for layer in feats}
            y = np.where(early, x["blocks.1"] @ w["blocks.1"], x["blocks.3"] @ w["blocks.3"])
            y = (y + 0.3 * rng.standard_normal(y.shape)).astype(np.float32)
            n_lh = int(subject.parts["lh"].sum())
            np.save(root / name / folder / f"lh_{split}{'ing' if split == 'train' else ''}_fmri.npy", y[:, :n_lh])
            np.save(root / name / folder / f"rh_{split}{'ing' if split == 'train' else ''}_fmri.npy", y[:, n_lh:])
    return root


def test_best_layer_table_and_map_find_the_layer_with_the_signal(small_cache, layered_data, tmp_path):
    cmp = tmp_path / "cmp"
    _compare([small_cache], layered_data, cmp, "--val-fraction", "0.3")  # 18 validation images a subject
    best = pd.read_csv(cmp / "best_layers.csv")
    early = best.query("group == 'prf-visualrois'")
    late = best.query("group in ('floc-faces', 'floc-words', 'floc-places', 'floc-bodies')")
    assert (early.layer == "blocks.1").all(), early
    assert (late.layer == "blocks.3").mean() > 0.75, late  # a few small ROIs may be noisy
    assert (early.depth == 0.5).all()
    maps = vertex_maps(cmp)
    ds = open_dataset(layered_data)
    for name, subject in ds.subjects.items():
        is_early = subject.rois()["prf-visualrois"][0] > 0
        depth = maps["subjects"][name]["depth"]["cache"]
        assert (depth[is_early] == 0.5).mean() > 0.7 and (depth[~is_early] == 1.0).mean() > 0.7


def test_variance_partition_recovers_unique_and_shared_parts():
    """A = [S, U_A], B = [S, U_B] (independent Gaussian blocks): targets driven by U_A are unique to
    A, by U_B unique to B, by S shared; the partition says so per target."""
    set_ridge_backend(torch.device("cpu"))
    rng = np.random.default_rng(0)
    n, n_val, d = 400, 200, 10
    blocks = {k: rng.standard_normal((n + n_val, d)) for k in ("S", "UA", "UB")}
    sides = [np.hstack([blocks["S"], blocks["UA"]]), np.hstack([blocks["S"], blocks["UB"]])]
    kernels = []
    for x in sides:
        scaler = LayerScaler.fit(torch.tensor(x[:n], dtype=torch.float32))
        z = scaler(torch.tensor(x, dtype=torch.float32))
        kernels.append({"train": z[:n] @ z[:n].T * scaler.weight, "val": z[n:] @ z[:n].T * scaler.weight})
    drivers = ["UA"] * 4 + ["UB"] * 4 + ["S"] * 4
    y = np.stack([blocks[k] @ rng.standard_normal(d) for k in drivers], 1)
    y = (y / y.std(0) + 0.5 * rng.standard_normal(y.shape)).astype(np.float32)  # R² ceiling 0.8
    res = partition_r2(kernels, torch.tensor(y[:n]), torch.tensor(y[n:]), np.arange(n), CompareConfig(n_iter=30))
    a, b, ab = (res[k].double().numpy() for k in ("a_r2", "b_r2", "ab_r2"))
    unique_a, unique_b, shared = ab - b, ab - a, a + b - ab
    ua, ub, s = slice(0, 4), slice(4, 8), slice(8, 12)
    assert (ab > 0.65).all()
    np.testing.assert_array_less(0.6, unique_a[ua])
    np.testing.assert_array_less(0.6, unique_b[ub])
    np.testing.assert_array_less(0.6, shared[s])
    for part, where in ((unique_a, [ub, s]), (unique_b, [ua, s]), (shared, [ua, ub])):
        for sl in where:
            np.testing.assert_array_less(np.abs(part[sl]), 0.1)


@pytest.mark.slow  # the report draws five surface maps: minutes on two CPU cores
def test_partition_folder_and_report(small_cache, train_data, tmp_path):
    cmp = tmp_path / "cmp"
    res = runner.invoke(
        app,
        ["compare", str(small_cache), "--data", str(train_data), "--out", str(cmp),
         "--partition", "cache:blocks.1", "--partition", "cache:blocks.3", "--n-iter", "5"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "variance partition" in res.output and "best model per ROI" in res.output
    part = pd.read_csv(cmp / "partition.csv")
    mean = part.query("subject == 'mean' and group == 'all'").iloc[0]
    assert mean.unique_a == pytest.approx(mean.r2_ab - mean.r2_b)
    assert mean.shared == pytest.approx(mean.r2_a + mean.r2_b - mean.r2_ab)
    assert not list((cmp / "units" / "partition").glob(".*"))  # the side kernels are removed once used
    page = tmp_path / "cmp.html"
    res = runner.invoke(app, ["report", str(cmp), "--out", str(page)])
    assert res.exit_code == 0, res.output
    html = page.read_text()
    assert "Model × layer" in html and "winning model" in html and "unique to A" in html
    assert html.count("data:image/png;base64,") >= 5


def test_resume_after_interruption_equals_one_run(small_cache, train_data, tmp_path):
    one = tmp_path / "one"
    _compare([small_cache], train_data, one)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    units = sorted((two / "units").rglob("*.safetensors"))
    for path in units[::2]:  # interrupted: half the units never written, one half-written file left
        path.unlink()
    (units[0].parent / f".{units[0].name}.tmp").write_bytes(b"partial")
    for name in (*TABLES, "summary.json"):
        (two / name).unlink()
    kept = {p: p.stat().st_mtime_ns for p in units[1::2]}
    _compare([small_cache], train_data, two)
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # done units are not redone
    for name, table in _tables(one).items():
        pd.testing.assert_frame_equal(_tables(two)[name], table, check_exact=False, rtol=1e-6)
    res = runner.invoke(app, ["compare", str(small_cache), "--data", str(train_data), "--out", str(two), "--seed", "1"])
    assert res.exit_code == 1 and "another config" in res.output and "Traceback" not in res.output


def test_sharded_equals_unsharded(small_cache, train_data, tmp_path):
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    args = ["--partition", "cache:blocks.1", "--partition", "cache:blocks.3", "--n-iter", "4"]
    _compare([small_cache, small_cache], train_data, one, *args)
    res = _compare([small_cache, small_cache], train_data, sharded, "--shard", "0/3", *args)
    assert not (sharded / "summary.json").exists()
    _compare([small_cache, small_cache], train_data, sharded, "--shard", "2/3", *args)
    _compare([small_cache, small_cache], train_data, sharded, "--shard", "1/3", *args)
    assert res.exit_code == 0 and (sharded / "summary.json").is_file()
    for name, table in _tables(one).items():
        pd.testing.assert_frame_equal(_tables(sharded)[name], table, check_exact=False, rtol=1e-6)
    pd.testing.assert_frame_equal(
        pd.read_csv(sharded / "partition.csv"), pd.read_csv(one / "partition.csv"), check_exact=False, rtol=1e-5
    )
    assert set(pd.read_csv(one / "leaderboard.csv").model) == {"cache", "cache-2"}


@pytest.mark.slow
def test_torchrun_equals_one_process(small_cache, train_data, tmp_path, torchrun):
    """Two torchrun ranks share the units (as --shard 0/2 and 1/2) and rank 0 merges: one run's tables."""
    one, ranks = tmp_path / "one", tmp_path / "ranks"
    _compare([small_cache, small_cache], train_data, one, "--no-all-layers")
    res = torchrun("compare", str(small_cache), str(small_cache), "--data", str(train_data), "--out", str(ranks),
                   "--no-all-layers", port=29521)  # fmt: skip
    log = res.stdout + res.stderr
    assert "shard 0/2" in log and "shard 1/2" in log and (ranks / "summary.json").is_file()
    for name, table in _tables(one).items():  # one thread a rank against two here: float32 sums differ
        pd.testing.assert_frame_equal(_tables(ranks)[name], table, check_exact=False, rtol=1e-4, atol=1e-3)
