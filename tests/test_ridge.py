"""fit-ridge: the solvers against scikit-learn, the feature reductions, the run folder through predict."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.linear_model import RidgeCV
from typer.testing import CliRunner

from blobenc.cli import app
from blobenc.data import open_dataset
from blobenc.errors import ConfigError
from blobenc.ridge import LayerScaler, check_features, loo_ridge, reduce_layer

runner = CliRunner()
ALPHAS = np.logspace(-2, 4, 13)


def _problem(n=60, d=20, v=7, seed=0, kind="gaussian"):
    """Uncentred features and targets: well conditioned (gaussian), or as real trunks give them
    (low rank plus small noise, strongly correlated columns, a constant column, large offsets)."""
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        X = rng.standard_normal((n, d))
    else:
        rank = max(2, min(n, d) // 6)
        X = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) + 1e-3 * rng.standard_normal((n, d))
        X[:, 1] = X[:, 0] + 1e-4 * rng.standard_normal(n)  # two nearly identical columns
        X[:, 2] = 3.0  # a constant (dead) channel
        X += 5.0  # activations far from zero mean (after a ReLU / GELU)
    Y = X @ rng.standard_normal((d, v)) * rng.uniform(0.05, 1, v) + 2 * rng.standard_normal((n, v)) + 10
    return X, Y


def _sklearn_loo(X, Y, alphas):
    ref = RidgeCV(alphas=alphas, alpha_per_target=True, fit_intercept=True, store_cv_results=True).fit(X, Y)
    return ref, ref.cv_results_.mean(0).T  # (alphas, targets) leave-one-out mse


def _centred(X, Y):
    return (torch.tensor(X - X.mean(0)), torch.tensor(Y - Y.mean(0), dtype=torch.float32))


@pytest.mark.parametrize("kind", ["gaussian", "ill-conditioned"])
@pytest.mark.parametrize("shape", [(60, 20), (30, 50), (40, 400)])  # primal (d < n), and the kernel path's shapes
def test_loo_ridge_equals_sklearn_ridgecv_with_intercept_at_every_alpha(shape, kind):
    """Centred data with the mean re-estimated in each left-out fit is RidgeCV(fit_intercept=True)
    on the raw data: the same leave-one-out error at every alpha, both paths, hence the same alphas."""
    X, Y = _problem(*shape, kind=kind)
    alphas = float((X - X.mean(0)).var(0).sum() * len(X)) * np.logspace(-6, 1, 15)  # blobenc's grid
    ref, ref_curve = _sklearn_loo(X, Y, alphas)
    x, y = _centred(X, Y)
    primal, dual = (x.float(), None), (None, (x @ x.T).float())
    for res in (loo_ridge(*inputs, y, alphas, curve=True) for inputs in (primal, dual)):
        np.testing.assert_allclose(res.curve.numpy(), ref_curve, rtol=2e-3)
        # the chosen alphas agree, up to ties within float32 noise where the curve is flat
        chosen = np.searchsorted(alphas, res.best_alpha.numpy() * (1 - 1e-6))
        at_chosen = ref_curve[chosen, np.arange(Y.shape[1])]
        np.testing.assert_array_less(at_chosen, ref_curve.min(0) * (1 + 2e-3))
        assert (np.isclose(res.best_alpha.numpy(), ref.alpha_, rtol=1e-5)).mean() >= 0.7
    if kind == "gaussian":  # predictions too
        new = np.random.default_rng(1).standard_normal((5, shape[1]))
        xn = torch.tensor(new - X.mean(0), dtype=torch.float32)
        primal = loo_ridge(x.float(), None, y, alphas)
        dual = loo_ridge(None, (x @ x.T).float(), y, alphas)
        want = ref.predict(new) - Y.mean(0)
        np.testing.assert_allclose((xn @ primal.coef).numpy(), want, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose((xn @ x.float().T @ dual.coef).numpy(), want, rtol=1e-3, atol=1e-3)


def test_loo_ridge_without_intercept_equals_sklearn_without():
    X, Y = _problem(30, 50)
    ref = RidgeCV(alphas=ALPHAS, alpha_per_target=True, fit_intercept=False).fit(X, Y)
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    for res in (loo_ridge(x, None, y, ALPHAS, intercept=False), loo_ridge(None, x @ x.T, y, ALPHAS, intercept=False)):
        np.testing.assert_allclose(res.best_alpha.numpy(), ref.alpha_, rtol=1e-5)


def test_loo_ridge_target_blocks_do_not_change_the_result():
    x, y = _centred(*_problem(40, 10, 9))
    x = x.float()
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
    x, y = _centred(*_problem(50, 12, 4))
    x = x.float()
    a, b = x[:, :6], x[:, 6:]

    def fit(a, b):
        z = [LayerScaler.fit(t)(t) for t in (a, b)]
        k = sum(t @ t.T / t.shape[1] for t in z)
        return loo_ridge(None, k, y, ALPHAS).coef

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
    blocks = tmp_path / "blocks"  # a subject predicted 5 images at a time: the same predictions
    res = runner.invoke(
        app, ["predict", str(run), "--data", str(train_data), "--out", str(blocks), "--block-images", "5"]
    )
    assert res.exit_code == 0, res.output
    for path in pred.glob("*/*.npy"):
        np.testing.assert_allclose(np.load(blocks / path.relative_to(pred)), np.load(path), atol=1e-5)

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
    assert _fit(small_cache, train_data, b, "--no-refit", "--feature-memory", "1K").exit_code == 0
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
        (["--max-memory", "100M"], "--max-memory 0.10 GB: fit-ridge needs ~"),  # its plan, before any work
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
        assert summary["val"]["selected"] == pytest.approx(sel_r, rel=1e-5)
        assert summary["val"]["selected"] >= max(ra.mean(), rb.mean())
    assert (selection_weights(np.array([[0.1, 0.9], [0.3, 0.3]]), "subject") == [[1, 1], [0, 0]]).all()


def test_stack_weights_never_lose_to_a_member():
    """A good member, pure noise, and the good one scaled x10: the noise gets ~0 weight, the scaled
    member is worth only its scale, and the cross-fitted combination scores at least the best member."""
    from scipy.optimize import nnls

    from blobenc.select import stack_folds, stack_weights

    rng = np.random.default_rng(0)
    n, v = 60, 300
    signal = rng.standard_normal((n, v))
    target = signal + rng.standard_normal((n, v))
    good = signal + 0.8 * rng.standard_normal((n, v))
    other = signal + 0.8 * rng.standard_normal((n, v))  # a second good run, errors independent
    noise = rng.standard_normal((n, v))
    folds = stack_folds(np.array([f"img{i}" for i in range(n)]))
    w, info = stack_weights([good, noise, 10 * other], target, folds, block=128)  # blocks smaller than V
    assert info["val_r2"] >= max(info["val_r2_runs"])
    assert w[1].mean() < 0.05  # noise
    assert 0.02 < w[2].mean() < 0.08  # x10: about a twentieth, next to ~0.4 for the good run
    assert info["val_r2"] > info["val_r2_runs"][0] + 0.02  # two runs with independent errors beat one
    w_alone, alone = stack_weights([good, noise], target, folds)
    assert alone["val_r2"] >= alone["val_r2_runs"][0] and w_alone[1].mean() < 0.05
    # one subset solve for every vertex: an exact non-negative least squares
    P = np.stack([good[:, 0], noise[:, 0], 10 * other[:, 0]], 1)
    w_one, _ = stack_weights([P[:, [j]] for j in range(3)], target[:, :1], np.zeros(n, int) + np.arange(n) % 2)
    if not np.isclose(w_one[:, 0], [1, 0, 0]).all() and not np.isclose(w_one[:, 0], [0, 0, 1]).all():
        np.testing.assert_allclose(w_one[:, 0], nnls(P, target[:, 0])[0], rtol=1e-3, atol=1e-6)


def _altered_run(run: Path, out: Path, change) -> Path:
    """A copy of a fit-ridge run whose coefficients, mean and validation predictions go through
    `change` (the features' z-scoring stays)."""
    shutil.copytree(run, out)
    for f in [*(out / "weights").glob("*.safetensors"), out / "val_pred.safetensors"]:
        with safe_open(str(f), framework="pt") as h:
            meta, t = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
        altered = [k for k in t if k.endswith(".coef") or k == "y_mean" or k.startswith("subj")]
        save_file(t | {k: change(t[k].float()).to(t[k].dtype) for k in altered}, str(f), meta)
    return out


def test_predict_stack_with_a_scaled_and_a_noise_run(small_cache, train_data, tmp_path):
    """The default combination through the CLI on real run folders: a ridge run, the same run with
    every weight x10, and one whose weights are noise. The combination's cross-fitted validation
    score is at least the best run's, and the noise run gets ~0 weight."""
    good = tmp_path / "good"
    assert _fit(small_cache, train_data, good).exit_code == 0
    torch.manual_seed(0)
    x10 = _altered_run(good, tmp_path / "x10", lambda t: 10 * t)
    noise = _altered_run(good, tmp_path / "noise", lambda t: torch.randn_like(t) * t.std())
    sel, alone = tmp_path / "sel", tmp_path / "alone"
    args = ["--data", str(train_data), "-q", "--json"]
    res = runner.invoke(
        app, ["predict", str(x10), str(noise), str(good), *args, str(sel / "s.json"), "--out", str(sel)]
    )
    assert res.exit_code == 0, res.output
    selection = json.loads((sel / "selection.json").read_text())
    assert selection["select"] == "stack"
    for s in selection["subjects"].values():
        assert s["val"]["selected"] >= max(s["val"]["runs"])
        assert s["share"][1] < 0.05
    assert runner.invoke(app, ["predict", str(good), *args, str(alone / "a.json"), "--out", str(alone)]).exit_code == 0
    combined, single = (json.loads(f.read_text())["score"] for f in (sel / "s.json", alone / "a.json"))
    # test score: the good run's, not dragged down by the others; what the noise run's small weight
    # (< 0.05, above) costs on 10 test images varies with the data: 1.2 points on today's synthetic data
    assert combined >= single - 2.0


def test_select_refuses_runs_on_other_splits(small_cache, train_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _fit(small_cache, train_data, a, "--no-refit").exit_code == 0
    assert _fit(small_cache, train_data, b, "--no-refit", "--seed", "1").exit_code == 0
    out = tmp_path / "sel"
    res = runner.invoke(app, ["predict", str(a), str(b), "--data", str(train_data), "--out", str(out)])
    assert res.exit_code == 1 and "validated on other images" in res.output and "Traceback" not in res.output
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_torchrun_fit_ridge_and_predict_share_subjects_like_one_process(small_cache, train_data, tmp_path, torchrun):
    """Subjects over 2 ranks: the same weights, validation scores and predictions as one process."""
    runner = CliRunner()
    alone, ranks = tmp_path / "alone", tmp_path / "ranks"
    args = ["fit-ridge", str(small_cache), "--data", str(train_data), "--device", "cpu", "-q"]
    assert runner.invoke(app, [*args, "--out", str(alone)]).exit_code == 0
    torchrun(*args, "--out", str(ranks), port=29518)
    one, two = (json.loads((d / "summary.json").read_text()) for d in (alone, ranks))
    assert [r["subject"] for r in two["subjects"]] == [r["subject"] for r in one["subjects"]]
    assert [r["rank"] for r in two["subjects"]] == [0, 1, 0] and {r["rank"] for r in one["subjects"]} == {0}
    assert two["val"]["median_r2"] == pytest.approx(one["val"]["median_r2"], abs=1e-5)
    names = [sorted(p.name for p in (d / "weights").iterdir()) for d in (alone, ranks)]
    assert names[0] == names[1]  # no validation hand-over file left
    for f in (alone / "weights").iterdir():
        a, b = load_file(f), load_file(ranks / "weights" / f.name)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    predicted = {}
    for name, run_dir in (("alone", alone), ("ranks", ranks)):
        pred = tmp_path / f"pred-{name}"
        predict_args = ["predict", str(run_dir), "--data", str(train_data), "--out", str(pred), "--device", "cpu", "-q"]
        if name == "alone":
            assert runner.invoke(app, predict_args).exit_code == 0
        else:
            torchrun(*predict_args, port=29519)
        predicted[name] = {p.relative_to(pred): np.load(p) for p in pred.rglob("*.npy")}
        assert not list(pred.glob(".predict-*"))  # the staging folder moved into place once
    assert predicted["ranks"].keys() == predicted["alone"].keys() and len(predicted["alone"]) == 6
    for k, v in predicted["alone"].items():
        np.testing.assert_allclose(predicted["ranks"][k], v, rtol=1e-4, atol=1e-5)
    # one subject on 2 ranks: rank 1 predicts none and still meets rank 0 at every collective
    one = tmp_path / "pred-one"
    torchrun("predict", str(ranks), "--data", str(train_data), "--out", str(one), "--subject", "subj01", port=29520)
    assert sorted(p.relative_to(one) for p in one.rglob("*.npy")) == sorted(
        k for k in predicted["alone"] if k.parts[0] == "subj01"
    )


def test_select_refuses_torchrun_in_one_line(train_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: each member's predict would share subjects out
    out = tmp_path / "pred"
    res = CliRunner().invoke(app, ["predict", "a", "b", "--data", str(train_data), "--out", str(out)])
    assert res.exit_code == 1 and "run it without torchrun" in res.output and not out.exists()
