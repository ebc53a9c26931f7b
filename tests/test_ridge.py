"""fit-ridge: the solvers against scikit-learn, the feature reductions, the run folder through predict."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.linear_model import RidgeCV
from typer.testing import CliRunner

from blobenc.cli import app
from blobenc.data.base import open_dataset
from blobenc.errors import ConfigError
from blobenc.ridge import LayerScaler, check_features, loo_ridge, reduce_layer

runner = CliRunner()
ALPHAS = np.logspace(-2, 4, 13)


def _problem(n=60, d=20, v=7, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    Y = X @ rng.standard_normal((d, v)) * rng.uniform(0.05, 1, v) + rng.standard_normal((n, v))
    return X - X.mean(0), Y - Y.mean(0)


@pytest.mark.parametrize("shape", [(60, 20), (30, 50)])  # primal (d < n) and the shape kernels are for
def test_loo_ridge_equals_sklearn_ridgecv_alpha_per_target(shape):
    X, Y = _problem(*shape)
    ref = RidgeCV(alphas=ALPHAS, alpha_per_target=True, fit_intercept=False).fit(X, Y)
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    primal = loo_ridge(x, None, y, ALPHAS)
    dual = loo_ridge(None, x @ x.T, y, ALPHAS)
    np.testing.assert_allclose(primal.best_alpha.numpy(), ref.alpha_, rtol=1e-5)
    np.testing.assert_allclose(dual.best_alpha.numpy(), ref.alpha_, rtol=1e-5)
    new = np.random.default_rng(1).standard_normal((5, shape[1]))
    want = ref.predict(new)
    xn = torch.tensor(new, dtype=torch.float32)
    np.testing.assert_allclose((xn @ primal.coef).numpy(), want, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose((xn @ x.T @ dual.coef).numpy(), want, rtol=1e-3, atol=1e-4)


def test_loo_ridge_target_blocks_do_not_change_the_result():
    X, Y = _problem(40, 10, 9)
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    whole, blocked = loo_ridge(x, None, y, ALPHAS), loo_ridge(x, None, y, ALPHAS, target_block=2)
    torch.testing.assert_close(whole.coef, blocked.coef)


def test_reductions_vit_and_cnn():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 1 prefix + 2x2 patches, 3 channels
    torch.testing.assert_close(reduce_layer(x, "cls", 1), x[:, 0])
    torch.testing.assert_close(reduce_layer(x, "mean", 1), x[:, 1:].mean(1))
    assert reduce_layer(x, "tokens", 1).shape == (2, 15)
    assert reduce_layer(x, "pool=1", 1).shape == (2, 3)
    torch.testing.assert_close(reduce_layer(x, "pool=2", 1), x[:, 1:].transpose(1, 2).flatten(1))
    m = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(reduce_layer(m, "mean", 0), m.mean((2, 3)))
    assert reduce_layer(m, "pool=2", 0).shape == (2, 12)
    with pytest.raises(ConfigError, match="no class token"):
        reduce_layer(m, "cls", 0)
    with pytest.raises(ConfigError, match="--features"):
        check_features("max")


def test_layer_scaling_changes_nothing():
    X, Y = _problem(50, 12, 4)
    x = torch.tensor(X, dtype=torch.float32)
    a, b = x[:, :6], x[:, 6:]

    def fit(a, b):
        z = [LayerScaler.fit(t)(t) for t in (a, b)]
        k = sum(t @ t.T / t.shape[1] for t in z)
        return loo_ridge(None, k, torch.tensor(Y, dtype=torch.float32), ALPHAS).coef

    torch.testing.assert_close(fit(a, b), fit(a * 1000, b), rtol=1e-3, atol=1e-4)


def _fit(cache, data, out, *args):
    return runner.invoke(app, ["fit-ridge", str(cache), "--data", str(data), "--out", str(out), *args])


def test_fit_ridge_run_predict_evaluate(small_cache, train_data, tmp_path):
    run = tmp_path / "run"
    res = _fit(small_cache, train_data, run)
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"]["median_r2"] > 0 and summary["val"]["mean_r"] > 0.1
    assert {r["subject"] for r in summary["subjects"]} == {"subj01", "subj02", "subj03"}
    assert (run / "run.json").is_file() and (run / "split.json").is_file()
    # fit-head with the same seed holds out the same images
    from blobenc.data.base import ValidationSplit

    split = ValidationSplit.load(run / "split.json")
    np.testing.assert_array_equal(split.val_keys, open_dataset(train_data).validation_split(0.1, 0).val_keys)
    ds = open_dataset(train_data)
    w = load_file(run / "weights" / "subj01.safetensors")
    assert w["y_mean"].shape == (ds.subjects["subj01"].n_targets,)
    assert w["blocks.1.coef"].shape == (64, ds.subjects["subj01"].n_targets)  # test_vit: 64 channels

    pred = tmp_path / "pred"
    res = runner.invoke(
        app, ["predict", str(run), "--data", str(train_data), "--out", str(pred), "--json", str(tmp_path / "p.json")]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", str(pred), "--data", str(train_data), "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["score"] > 5  # the devkit's noise-normalized score, well above a constant's 0
    assert json.loads((tmp_path / "p.json").read_text())["score"] == pytest.approx(scores["score"])

    res = runner.invoke(app, ["finetune", str(run), "--data", str(train_data), "--out", str(tmp_path / "ft")])
    assert res.exit_code == 1 and "fit-ridge run" in res.output and "Traceback" not in res.output


def test_fit_ridge_primal_kernel_and_dual_storage_agree(small_cache, train_data, tmp_path, monkeypatch):
    """Features wider than the images (tokens: kernel ridge) and the same run kept dual (training
    keys + dual coefficients) predict the same test responses."""
    import blobenc.train.ridge as ridge_mod

    a = tmp_path / "a"
    assert _fit(small_cache, train_data, a, "--features", "tokens").exit_code == 0
    monkeypatch.setattr(ridge_mod, "PRIMAL_LIMIT", 0)  # keep every solution dual
    b = tmp_path / "b"
    assert _fit(small_cache, train_data, b, "--features", "tokens").exit_code == 0
    from safetensors import safe_open

    with safe_open(str(b / "weights" / "subj02.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["form"] == "dual" and len(json.loads(meta["train_keys"])) > 40
    for run in (a, b):
        res = runner.invoke(app, ["predict", str(run), "--data", str(train_data), "--out", str(run / "pred"), "-q"])
        assert res.exit_code == 0, res.output
    for hemi in ("lh", "rh"):
        pa, pb = (np.load(r / "pred" / "subj02" / f"{hemi}_pred_test.npy") for r in (a, b))
        np.testing.assert_allclose(pa, pb, rtol=1e-3, atol=1e-3)
    summary = json.loads((a / "summary.json").read_text())
    assert {r["solver"] for r in summary["subjects"]} == {"kernel"}


def test_fit_ridge_streamed_layers_equal_in_memory(small_cache, train_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _fit(small_cache, train_data, a, "--no-refit").exit_code == 0
    assert _fit(small_cache, train_data, b, "--no-refit", "--max-memory", "1K").exit_code == 0
    va, vb = (json.loads((r / "summary.json").read_text())["val"] for r in (a, b))
    assert va["median_r2"] == pytest.approx(vb["median_r2"], rel=1e-4)


def test_banded_ridge_prefers_the_layer_with_signal(tmp_path):
    """Two layers, only one carries the targets: most targets weight it highest."""
    from blobenc.ridge import banded_ridge, set_ridge_backend

    set_ridge_backend(torch.device("cpu"))
    rng = np.random.default_rng(0)
    n = 80
    good, noise = rng.standard_normal((n, 10)), rng.standard_normal((n, 10))
    Y = good @ rng.standard_normal((10, 30)) + 0.5 * rng.standard_normal((n, 30))
    z = [torch.tensor(LayerScaler.fit(torch.tensor(t)).__call__(torch.tensor(t)).numpy()) for t in (good, noise)]
    kernels = torch.stack([t @ t.T / t.shape[1] for t in z]).float()
    folds = [(np.flatnonzero(np.arange(n) % 4 != f), np.flatnonzero(np.arange(n) % 4 == f)) for f in range(4)]
    _, weights = banded_ridge(kernels, torch.tensor(Y - Y.mean(0)).float(), ALPHAS, folds, 20, 0)
    share = weights / weights.sum(0)
    assert (share[0] > share[1]).float().mean() > 0.8


def test_fit_ridge_banded_run_saves_layer_weights(small_cache, train_data, tmp_path):
    run = tmp_path / "banded"
    res = _fit(small_cache, train_data, run, "--banded", "--n-iter", "5", "--no-refit", "--report")
    assert res.exit_code == 0, res.output
    html = (run / "report.html").read_text()
    assert "fit-ridge" in html and "data:image/png;base64," in html
    w = load_file(run / "weights" / "subj01.safetensors")
    n = open_dataset(train_data).subjects["subj01"].n_targets
    assert w["layer_weights"].shape == (n, 2)
    torch.testing.assert_close(w["layer_weights"].sum(1), torch.ones(n))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "nope.*"], "--layers 'nope.*' matches no layer"),
        (["--alphas", "1,-1"], "--alphas"),
        (["--alphas", "x"], "--alphas 'x'"),
        (["--features", "max"], "--features 'max'"),
    ],
)
def test_fit_ridge_bad_inputs_write_nothing(small_cache, train_data, tmp_path, args, message):
    run = tmp_path / "run"
    res = _fit(small_cache, train_data, run, *args)
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert not run.exists()


def test_fit_ridge_refuses_a_cache_of_another_dataset(small_cache, small_data, tmp_path):
    res = _fit(small_cache, small_data, tmp_path / "run")
    assert res.exit_code == 1 and "not extracted from this dataset" in res.output
    assert not (tmp_path / "run").exists()


def test_select_per_vertex_takes_the_better_run(small_cache, train_data, tmp_path):
    """Two runs on the same split that differ (each sees one layer): every vertex takes the run with
    the better validation r there, and the written predictions are those runs' own, picked per vertex."""
    from blobenc.select import selection_weights

    a, b = tmp_path / "a", tmp_path / "b"
    assert _fit(small_cache, train_data, a, "--layers", "blocks.1").exit_code == 0
    assert _fit(small_cache, train_data, b, "--layers", "blocks.3").exit_code == 0
    sel = tmp_path / "sel"
    res = runner.invoke(
        app, ["predict", str(a), str(b), "--data", str(train_data), "--out", str(sel), "--select", "vertex"]
    )
    assert res.exit_code == 0, res.output
    ds = open_dataset(train_data)
    weights = load_file(sel / "selection.safetensors")
    for run in (a, b):
        assert (
            runner.invoke(
                app, ["predict", str(run), "--data", str(train_data), "--out", str(run / "p"), "-q"]
            ).exit_code
            == 0
        )
    for name in ds.subjects:
        ra, rb = (load_file(r / "val_vertex.safetensors")[f"{name}.r"].numpy() for r in (a, b))
        w = weights[f"{name}.weights"].numpy()
        np.testing.assert_array_equal(w[1] == 1, rb > ra)
        pa, pb = (ds.read_predictions(r / "p", name) for r in (a, b))
        np.testing.assert_allclose(ds.read_predictions(sel, name), np.where(rb > ra, pb, pa), rtol=1e-6)
        sel_r = np.where(rb > ra, rb, ra).mean()
        summary = json.loads((sel / "selection.json").read_text())["subjects"][name]
        assert summary["val_mean_r"] == pytest.approx(sel_r, rel=1e-5)
        assert summary["val_mean_r"] >= max(ra.mean(), rb.mean())
    blend = selection_weights(np.array([[0.5, -0.1, 0.0], [0.5, 0.2, 0.0]]), "blend")
    np.testing.assert_allclose(blend, [[0.5, 0, 0.5], [0.5, 1, 0.5]])
    assert (selection_weights(np.array([[0.1, 0.9], [0.3, 0.3]]), "subject") == [[1, 1], [0, 0]]).all()


def test_select_refuses_runs_on_other_splits(small_cache, train_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _fit(small_cache, train_data, a, "--no-refit").exit_code == 0
    assert _fit(small_cache, train_data, b, "--no-refit", "--seed", "1").exit_code == 0
    out = tmp_path / "sel"
    res = runner.invoke(app, ["predict", str(a), str(b), "--data", str(train_data), "--out", str(out)])
    assert res.exit_code == 1 and "validated on other images" in res.output and "Traceback" not in res.output
    assert not out.exists() or not any(out.iterdir())
