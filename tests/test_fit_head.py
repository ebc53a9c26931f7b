"""fit-head end to end: the CLI, sweeps, ensembles, schedules, streaming, plans, int8 features, predict."""

import json

import numpy as np
import pytest
import torch
from helpers import TINY_ARGS, cfg, yaml_load
from safetensors.torch import load_file
from typer.testing import CliRunner

from blobenc import AlgonautsDataset, ConfigError
from blobenc.cli import app
from blobenc.features.trunk import TrunkSpec
from blobenc.heads import create_head
from blobenc.pca import GroupPCA
from blobenc.train.checkpoint import resolve_run
from blobenc.train.config import HeadConfig, load_config, sweep_configs
from blobenc.train.fit import fit_head

runner = CliRunner()


def test_reference_config_keys_and_bad_values(tmp_path):
    path = tmp_path / "ref.yaml"
    path.write_text(
        "epochs: 40\nbatch_size: 512\nlr: 6.0e-4\nweight_decay: 0.8\ndropout: 0.9\nproj_dim: 2048\n"
        "hidden_dim: 1024\nwarmup_fraction: 0.05\nmin_lr_fraction: 0.05\n"
    )
    c = load_config(path, ["lr=1e-3", "layers=[blocks.0, blocks.2]"])
    assert (c.epochs, c.batch_size, c.lr, c.weight_decay, c.layers) == (40, 512, 1e-3, 0.8, ("blocks.0", "blocks.2"))
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rate'; valid keys: head, layers, epochs"):
        load_config(None, ["learning_rate=1"])
    with pytest.raises(ConfigError, match="epochs='ten': expected int"):
        load_config(None, ["epochs=ten"])
    with pytest.raises(ConfigError, match=r"dropout=1.5: expected a fraction in \[0, 1\)"):
        load_config(None, ["dropout=1.5"])
    with pytest.raises(ConfigError, match="--sweep batch_size: sets the shared data order"):
        sweep_configs(HeadConfig(), ["batch_size=1,2"])
    grid = sweep_configs(HeadConfig(), ["lr=1e-3,2e-3", "dropout=0.1,0.5", "weight_decay=0,0.1"])
    assert len(grid) == 8 and len({(g.lr, g.dropout, g.weight_decay) for g in grid}) == 8


def test_fit_head_cli_positive_r2_and_predict(small_cache, train_data, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(
        app,
        [
            "fit-head",
            str(small_cache),
            "--data",
            str(train_data),
            "--out",
            str(run),
            "--set",
            "epochs=6",
            *TINY_ARGS,
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val"]["median_r2"] > 0 and -1 <= summary["best_epoch"] < 6  # -1: the closed-form start
    assert "validation R² per ROI" in res.output
    assert set(summary["val_rois"]["prf-visualrois"]["V1v"]) == {"lh", "rh"}
    assert set(summary["val"]["subjects"]) == {"subj01", "subj02", "subj03"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(6)) and all("median_r2" in m["val"] for m in lines)
    for name in ("best.safetensors", "last.safetensors", "model.json", "config.yaml", "split.json", "pca.safetensors"):
        assert (run / name).is_file()
    assert not any(p.suffix in (".pt", ".pth", ".pkl") for p in run.iterdir())
    vertex = load_file(run / "val_vertex.safetensors")  # per-vertex validation scores, native order
    ds = AlgonautsDataset(train_data)
    for name, s in ds.subjects.items():
        assert vertex[f"{name}.r"].shape == vertex[f"{name}.r2"].shape == (s.n_vertices_total,)
        got = float(np.median(vertex[f"{name}.r2"].numpy()))
        assert got == pytest.approx(summary["val"]["subjects"][name]["median_r2"], abs=1e-5)

    pred = tmp_path / "pred"
    res = runner.invoke(
        app, ["predict", str(run), "--data", str(train_data), "--out", str(pred), "--json", str(tmp_path / "p.json")]
    )
    assert res.exit_code == 0, res.output
    ds = AlgonautsDataset(train_data)
    for name, s in ds.subjects.items():  # native shapes
        for hemi in ("lh", "rh"):
            arr = np.load(pred / name / f"{hemi}_pred_test.npy")
            assert arr.shape == (10, s.n_vertices[hemi]) and arr.dtype == np.float32
    res = runner.invoke(app, ["evaluate", str(pred), "--data", str(train_data), "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0
    predicted = json.loads((tmp_path / "p.json").read_text())
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert predicted["score"] == pytest.approx(evaluated["score"])

    res = runner.invoke(
        app, ["predict", str(run), "--data", str(train_data), "--out", str(pred), "--subject", "subj09"]
    )
    assert res.exit_code == 1 and "--subject subj09: the run was trained on subj01" in res.output


def test_predict_cached_equals_trunk_path(small_cache, train_data, tmp_path):
    from blobenc.predictions import predict

    fit_head(small_cache, train_data, tmp_path / "run", [cfg(epochs=1)], progress=False)
    predict(tmp_path / "run", train_data, tmp_path / "cached", "subj02", device="cpu", progress=False)
    predict(tmp_path / "run", train_data, tmp_path / "trunk", "subj02", device="cpu", use_cache=False, progress=False)
    for hemi in ("lh", "rh"):
        a = np.load(tmp_path / "cached" / "subj02" / f"{hemi}_pred_test.npy")
        b = np.load(tmp_path / "trunk" / "subj02" / f"{hemi}_pred_test.npy")
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_sweep_trials_equal_solo_runs(small_cache, train_data, tmp_path):
    grid = sweep_configs(cfg(), ["lr=1e-3,3e-3", "dropout=0.1,0.5"])
    summary = fit_head(small_cache, train_data, tmp_path / "sweep", grid, progress=False)
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(sweep["trials"]) == 4 and summary["trial"] == sweep["best"]
    scores = [t["median_r2"] for t in sweep["trials"]]
    assert scores == sorted(scores, reverse=True)
    solo = fit_head(small_cache, train_data, tmp_path / "solo", [grid[3]], progress=False)
    a = load_file(tmp_path / "sweep" / "trial-03" / "last.safetensors")
    b = load_file(tmp_path / "solo" / "last.safetensors")
    for k in a:  # CPU reductions may round differently with memory alignment: 1-ulp differences
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    solo_row = solo["trials"][0]
    trial_row = next(t for t in sweep["trials"] if t["dir"] == "trial-03")
    assert trial_row["median_r2"] == pytest.approx(solo_row["median_r2"], abs=1e-6)
    assert resolve_run(tmp_path / "sweep") == tmp_path / "sweep" / sweep["best"]


def test_run_folder_holds_the_embedding_once(small_cache, train_data, tmp_path):
    from blobenc.run import load_run

    grid = sweep_configs(cfg(epochs=2), ["lr=1e-3,3e-3"])
    fit_head(small_cache, train_data, tmp_path / "sweep", grid, checkpoint_minutes=0, progress=False)
    pca = GroupPCA.load(tmp_path / "sweep" / "pca.safetensors")
    for trial in ("trial-00", "trial-01"):
        tdir = tmp_path / "sweep" / trial
        assert not (tdir / "pca.safetensors").exists()
        assert json.loads((tdir / "model.json").read_text())["pca"] == "../pca.safetensors"
        for name in ("best", "last", "state"):
            assert not any("embed" in k for k in load_file(tdir / f"{name}.safetensors")), name
        lines = [json.loads(line) for line in (tdir / "metrics.jsonl").read_text().splitlines()]
        assert all(m["bytes_written"] > 0 and m["seconds"] > 0 and m["samples_per_s"] > 0 for m in lines)
    loaded = load_run(tmp_path / "sweep")
    model, spec = loaded.module, loaded.spec
    torch.testing.assert_close(model.embed.weight, torch.from_numpy(pca.components_).T, rtol=0, atol=0)
    torch.testing.assert_close(model.embed.bias, torch.from_numpy(pca.mean_), rtol=0, atol=0)
    # the rebuilt model predicts as the one trained: its best weights plus the run's PCA
    ref = create_head(spec.head, **spec.kwargs)
    ref.set_embedding(torch.from_numpy(pca.components_), torch.from_numpy(pca.mean_))
    ref.load_state_dict(load_file(resolve_run(tmp_path / "sweep") / "best.safetensors"), strict=False)
    feats = [torch.randn(3, *s) for s in spec.kwargs["layer_shapes"]]
    with torch.no_grad():
        torch.testing.assert_close(model(feats, torch.tensor([0, 1, 2])), ref.eval()(feats, torch.tensor([0, 1, 2])))
    # the default policy: checkpoints at the end only (short run), the best weights kept in memory until then
    fit_head(small_cache, train_data, tmp_path / "one", [cfg(epochs=3)], progress=False)
    lines = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["bytes_written"] > 0 for m in lines] == [False, False, True]


@pytest.mark.parametrize("n_train", [40, 430, 1_700, 9_000, 75_000, 300_000])
def test_schedule_derives_from_the_training_samples(n_train):
    from blobenc.train import config as c

    got = c.resolve_schedule(HeadConfig(), n_train)
    steps_per_epoch = -(-n_train // got.batch_size)
    steps = got.epochs * steps_per_epoch
    assert got.batch_size & (got.batch_size - 1) == 0 and got.batch_size <= max(n_train // 2, 2)
    assert c.MIN_BATCH <= got.batch_size <= 512 or got.batch_size <= n_train // 2
    assert steps >= c.MIN_STEPS - steps_per_epoch / 2  # enough steps to converge at small n
    assert got.proj_dim % 64 == 0 and c.MIN_PROJ <= got.proj_dim <= min(2048, max(64, n_train // 4))
    if n_train >= 75_000:  # the reference's schedule and PCA at its scale: 40 epochs of 512, P 2048
        assert (got.batch_size, got.epochs, got.proj_dim) == (512, 40, 2048)
    # values a config gives stand; only the missing one is derived
    assert c.resolve_schedule(HeadConfig(epochs=3), n_train).epochs == 3
    assert c.resolve_schedule(HeadConfig(batch_size=16), n_train).batch_size == 16
    given = HeadConfig(epochs=2, batch_size=8, proj_dim=32)
    assert c.resolve_schedule(given, n_train) == given


def test_derived_schedule_is_recorded(small_cache, train_data, tmp_path):
    from blobenc.train.config import default_batch_size

    fit_head(small_cache, train_data, tmp_path / "r", [cfg(epochs=2, batch_size=None)], progress=False)
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["configs"][0]["batch_size"] is None  # what was asked, which --resume compares
    resolved = run["resolved"][0]
    assert resolved["batch_size"] == default_batch_size(run["train_samples"]) and resolved["epochs"] == 2
    assert yaml_load(tmp_path / "r" / "config.yaml")["batch_size"] == resolved["batch_size"]


def test_search_draws_configs_over_the_space():
    from blobenc.train.config import search_configs

    configs, space = search_configs(cfg(), ["lr=1e-4:1e-2", "hidden_dim=16,32"], 8)
    assert len({c.lr for c in configs}) == 8 and {c.hidden_dim for c in configs} <= {16, 32}
    assert all(1e-4 <= c.lr <= 1e-2 for c in configs) and space["lr"].log
    again, _ = search_configs(cfg(), ["lr=1e-4:1e-2", "hidden_dim=16,32"], 8)
    assert again == configs  # seeded by the config's seed
    with pytest.raises(ConfigError, match="--sweep seed: not a searchable key"):
        search_configs(cfg(), ["seed=1:3"], 2)


def test_ensemble_predicts_the_mean_of_its_members(small_cache, train_data, tmp_path):
    from blobenc.heads import HeadEnsemble
    from blobenc.run import load_run

    summary = fit_head(small_cache, train_data, tmp_path / "e", [cfg(epochs=2)], ensemble=3, progress=False)
    members = json.loads((tmp_path / "e" / "ensemble.json").read_text())["members"]
    assert sorted(members) == ["trial-00", "trial-01", "trial-02"] and "median_r2" in summary["ensemble"]["val"]
    seeds = [yaml_load(tmp_path / "e" / m / "config.yaml")["init_seed"] for m in sorted(members)]
    assert seeds == [0, 1, 2]
    loaded = load_run(tmp_path / "e")
    model, spec = loaded.module, loaded.spec
    assert isinstance(model, HeadEnsemble) and spec.ensemble == members
    feats = [torch.randn(4, *s) for s in spec.kwargs["layer_shapes"]]
    subject = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        got = model(feats, subject)
        each = [load_run(tmp_path / "e" / m).module(feats, subject) for m in members]
    torch.testing.assert_close(got, torch.stack(each).mean(0), rtol=1e-5, atol=1e-5)
    # a sweep's best 2, by validation score
    grid = sweep_configs(cfg(epochs=2), ["lr=3e-4,1e-3,3e-3"])
    summary = fit_head(small_cache, train_data, tmp_path / "s", grid, ensemble=2, progress=False)
    assert summary["ensemble"]["members"] == [r["dir"] for r in summary["trials"][:2]]


def test_closed_form_start(small_cache, train_data, tmp_path):
    grid = sweep_configs(cfg(epochs=1, lr=1e-5), ["init=random,ridge,pca-ridge"])
    summary = fit_head(small_cache, train_data, tmp_path / "i", grid, progress=False)
    scores = {r["config"]["init"]: r["median_r2"] for r in summary["trials"]}
    # barely trained (lr 1e-5): the closed-form starts are far ahead of the random one
    assert scores["ridge"] > scores["random"] + 0.05 and scores["pca-ridge"] > scores["random"] + 0.05
    spec = json.loads((tmp_path / "i" / "trial-01" / "model.json").read_text())
    assert spec["start"]["val_loss"] <= spec["start"]["shared_val_loss"] + 1e-6
    # a start is validated before any step and stands as the best until an epoch beats it
    for row in summary["trials"]:
        if row["config"]["init"] != "random":
            assert row["start_median_r2"] is not None and row["median_r2"] >= row["start_median_r2"]


def test_fit_head_bad_inputs(small_cache, train_data, tmp_path):
    res = runner.invoke(
        app,
        ["fit-head", str(small_cache), "--data", str(train_data), "--out", str(tmp_path / "r"), "--set", "hidden=3"],
    )
    assert res.exit_code == 1 and "unknown config key 'hidden'; valid keys:" in res.output
    res = runner.invoke(
        app, ["fit-head", str(tmp_path / "nope"), "--data", str(train_data), "--out", str(tmp_path / "r2")]
    )
    assert res.exit_code == 1 and "feature cache not found" in res.output and "Traceback" not in res.output
    # one validation image seen by one subject: no R² to select epochs by, so say so before training
    out = tmp_path / "r3"
    res = runner.invoke(
        app, ["fit-head", str(small_cache), "--data", str(train_data), "--out", str(out), "--set", "val_fraction=0.001"]
    )
    assert res.exit_code == 1 and "1 validation samples; at least 2 of each are needed" in res.output, res.output
    assert "change val_fraction" in res.output and not (out / "best.safetensors").exists()


def test_streaming_path_trains_and_matches_memory_scores(small_cache, train_data, tmp_path):
    from blobenc.train.data import HeadData

    ds = AlgonautsDataset(train_data)
    from blobenc.features.cache import FeatureCache

    cache = FeatureCache.open(small_cache)
    split = ds.validation_split(0.2, 0)
    mem = HeadData(cache, ds, split, None, torch.device("cpu"))
    stream = HeadData(cache, ds, split, None, torch.device("cpu"))
    assert mem.features is None and stream.stream is None  # nothing read before read_features
    mem.read_features()
    stream.read_features(max_memory=1 << 20, batch_size=8)
    assert mem.features is not None and stream.stream is not None
    # every training sample exactly once per epoch, with the same features as the in-memory path
    seen = []
    g = torch.Generator().manual_seed(0)
    v = stream.group.n_vertices
    weight, bias = torch.randn(v, 5, generator=g), torch.randn(v, generator=g)
    stream.embed(weight, bias)
    mem.embed(weight, bias, block=7)  # fMRI read in blocks of 7 rows: the same targets
    # to float32 rounding: a matrix product's blocking depends on its number of rows
    torch.testing.assert_close(mem.targets.r, stream.targets.r, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mem.targets.q, stream.targets.q, rtol=1e-5, atol=1e-4)
    for _, subject, r, q in stream.train_batches(8, seed=0, epoch=0):
        assert len(subject) == len(r) == len(q) >= 2
        seen.append(r)
    rows = torch.cat(seen)
    assert len(rows) == len(mem.sets["train"])
    assert len(torch.unique(rows, dim=0)) == len(rows)  # no sample twice
    idx, feats, _ = next(stream.val_batches(8))
    ref = mem.features_of("val", idx)
    for a, b in zip(feats, ref, strict=True):
        torch.testing.assert_close(a, b)
    config = [cfg(epochs=10, batch_size=16, init="random")]  # a closed-form start would be the same for both
    streamed = fit_head(small_cache, train_data, tmp_path / "s", config, feature_memory=1 << 20, progress=False)
    in_memory = fit_head(small_cache, train_data, tmp_path / "m", config, progress=False)
    # the same steps over the same samples in another order (chunks through a shuffle buffer): it
    # learns as the in-memory path does (features and targets that did not match would score ~0)
    assert streamed["trials"][0]["steps"] == in_memory["trials"][0]["steps"]
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]
    assert streamed["val"]["median_r2"] > 0.5 * in_memory["val"]["median_r2"] > 0


@pytest.mark.slow
def test_torchrun_two_processes_gloo(small_cache, train_data, tmp_path, torchrun):
    """DDP: each rank trains on its slice of every batch, rank 0 writes. Not bit-equal to one
    process (each rank draws its own dropout and normalizes its own slice), but as good."""
    args = ["fit-head", str(small_cache), "--data", str(train_data), "--set", "epochs=3", *TINY_ARGS, "--device", "cpu"]
    torchrun(*args, "--out", str(tmp_path / "ddp"), "--quiet", port=29517)
    out = tmp_path / "ddp"
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]  # one writer, not one per rank
    assert CliRunner().invoke(app, [*args, "--out", str(tmp_path / "alone"), "--quiet"]).exit_code == 0
    last = [
        json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["val"]["median_r2"]
        for d in (out, tmp_path / "alone")
    ]
    assert last[0] > last[1] - 0.03  # as good as alone: the trained epoch, not the closed-form start both keep


def test_predict_images_folder(small_cache, train_data, tmp_path):
    import shutil

    fit_head(small_cache, train_data, tmp_path / "run", [cfg(epochs=1)], progress=False)
    folder = tmp_path / "imgs"
    folder.mkdir()
    sources = sorted((train_data / "subj01/test_split/test_images").iterdir())[:3]
    for i, src in enumerate(sources):
        shutil.copy(src, folder / f"stim{i}.png")
    res = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "run"),
            "--data",
            str(train_data),
            "--subject",
            "subj03",
            "--images",
            str(folder),
            "--out",
            str(tmp_path / "pred"),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pred/images.txt").read_text().split() == ["stim0.png", "stim1.png", "stim2.png"]
    n_lh = AlgonautsDataset(train_data).subjects["subj03"].n_vertices["lh"]
    got = np.load(tmp_path / "pred/subj03/lh_pred_images.npy")
    assert got.shape == (3, n_lh)
    # the same images through their test-split path (cached features) give the same predictions
    runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "run"),
            "--data",
            str(train_data),
            "--subject",
            "subj03",
            "--out",
            str(tmp_path / "ref"),
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    ref = np.load(tmp_path / "ref/subj03/lh_pred_test.npy")
    order = [p.name for p in sorted((train_data / "subj03/test_split/test_images").iterdir())]
    rows = [order.index(s.name) for s in sources]  # the test images are shared by every subject
    np.testing.assert_allclose(got, ref[rows], rtol=1e-3, atol=1e-3)


def test_reuse_pca_file(small_cache, train_data, tmp_path):
    fit_head(small_cache, train_data, tmp_path / "a", [cfg(epochs=1)], progress=False)
    res = runner.invoke(
        app,
        [
            "fit-head",
            str(small_cache),
            "--data",
            str(train_data),
            "--out",
            str(tmp_path / "b"),
            "--pca",
            str(tmp_path / "a/pca.safetensors"),
            "--set",
            "epochs=1",
            *TINY_ARGS[:-2],
        ],
    )
    assert res.exit_code == 0, res.output
    a, b = load_file(tmp_path / "a/pca.safetensors"), load_file(tmp_path / "b/pca.safetensors")
    torch.testing.assert_close(a["components"], b["components"], rtol=0, atol=0)
    other = tmp_path / "other.safetensors"
    pca = GroupPCA(3).fit(np.random.default_rng(0).normal(size=(10, 7)).astype(np.float32))
    from blobenc.data.algonauts import GroupSpace

    pca.group = GroupSpace.from_hemispheres({"lh": np.arange(3), "rh": np.arange(4)}, {"lh": 10, "rh": 10})
    pca.save(other)
    res = runner.invoke(
        app,
        ["fit-head", str(small_cache), "--data", str(train_data), "--out", str(tmp_path / "c"), "--pca", str(other)],
    )
    assert res.exit_code == 1 and "fitted in another vertex space" in res.output


def test_config_file_device_stands_unless_the_flag_is_given(tmp_path):
    from blobenc.train.config import runtime_overrides

    path = tmp_path / "c.yaml"
    path.write_text("device: cpu\nprecision: fp32\n")
    assert load_config(path, runtime_overrides("auto", "auto")).device == "cpu"  # defaults do not override
    c = load_config(path, runtime_overrides("cuda:1", "bf16"))
    assert (c.device, c.precision) == ("cuda:1", "bf16")


def test_predict_from_the_cache_imports_no_training_libraries(small_cache, train_data, tmp_path):
    """A cached-feature predict needs neither timm (the trunk, the scheduler) nor scikit-learn:
    importing them is 3 s of a 7 s predict. The import happens in a fresh interpreter."""
    import subprocess
    import sys

    fit_head(small_cache, train_data, tmp_path / "run", [cfg(epochs=1)], progress=False)
    code = (
        "import sys; from blobenc.predictions import predict; "
        f"predict({str(tmp_path / 'run')!r}, {str(train_data)!r}, {str(tmp_path / 'pred')!r}, progress=False); "
        "print(sorted(m for m in ('timm', 'torchvision', 'sklearn') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "[]", res.stdout
    assert (tmp_path / "pred" / "subj01" / "lh_pred_test.npy").is_file()


def test_fit_head_refuses_a_plan_beyond_max_memory_before_any_work(small_cache, train_data, tmp_path):
    from typer.testing import CliRunner

    from blobenc.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["fit-head", str(small_cache), "--data", str(train_data), "--out", str(out), "--max-memory", "200M"]
    )
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "--max-memory 0.21 GB: fit-head needs ~" in res.output and "pca_samples" in res.output
    assert not out.exists()  # nothing written, not even the folder or its log
    res = CliRunner().invoke(app, ["fit-head", str(small_cache), "--data", str(train_data), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output


def test_predict_by_blocks_of_images_equals_one_block_and_refuses_beyond_max_memory(small_cache, train_data, tmp_path):
    from typer.testing import CliRunner

    from blobenc.cli import app

    fit_head(small_cache, train_data, tmp_path / "run", [cfg(epochs=1)], progress=False)
    base = ["predict", str(tmp_path / "run"), "--data", str(train_data), "-q"]
    runs = {"whole": [], "blocks": ["--block-images", "3"], "train": ["--split", "train", "--block-images", "5"]}
    for name, extra in runs.items():
        res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
    ds = AlgonautsDataset(train_data)
    for hemi in ("lh", "rh"):
        whole = np.load(tmp_path / "whole" / "subj02" / f"{hemi}_pred_test.npy")
        np.testing.assert_allclose(np.load(tmp_path / "blocks" / "subj02" / f"{hemi}_pred_test.npy"), whole, atol=1e-5)
        train = np.load(tmp_path / "train" / "subj02" / f"{hemi}_pred_train.npy")
        assert train.shape == (len(ds.subjects["subj02"].keys["train"]), whole.shape[1])
    for extra, message in (
        (["--max-memory", "100M"], "--max-memory 0.10 GB: predict needs ~"),
        (["--block-images", "0"], "--block-images 0: expected at least 1"),
    ):
        res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "refused"), *extra])
        assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
        assert not (tmp_path / "refused").exists()  # refused before any work


@pytest.mark.parametrize("trunk", ["vit", "cnn-views"])
def test_int8_features_are_within_half_a_step_of_each_image_channel_at_half_the_memory(
    trunk, small_cache, train_data, tmp_path
):
    """int8 in memory: every value within half a quantization step of its image's channel scale
    (largest magnitude over the positions / 127), ViT tokens (T, C) and CNN maps (C, H, W) with views."""
    from blobenc.data import open_dataset
    from blobenc.features.cache import FeatureCache
    from blobenc.features.extract import ExtractConfig, extract
    from blobenc.train.data import CachedFeatures, feature_row_bytes

    path = small_cache
    if trunk == "cnn-views":
        index = open_dataset(train_data).unique_images()
        path = tmp_path / "cnn"
        config = ExtractConfig(
            trunk=TrunkSpec("test_resnet", False), layers=("layer[24]",), views=2, num_workers=0, device="cpu"
        )
        extract(index.keys[:40], list(index.paths)[:40], path, config, progress=False)
    cache = FeatureCache.open(path)
    rows = np.arange(0, len(cache.keys), 3)
    cpu = torch.device("cpu")
    exact = CachedFeatures(cache, cache.layers, rows, cpu)
    packed = CachedFeatures(cache, cache.layers, rows, cpu, dtype="int8")
    assert packed.nbytes < 0.53 * exact.nbytes
    assert packed.nbytes == len(rows) * feature_row_bytes(cache, cache.layers, "int8")
    pick = np.array([0, 2, 5])
    views = [None] if cache.attrs["views"] == 1 else [np.array([0, 1, 1]), np.array([1, 0, 0])]
    for view in views:
        for x, y in zip(exact.gather(pick, view), packed.gather(pick, view), strict=True):
            positions = tuple(a for a in range(1, x.ndim) if a != (x.ndim - 1 if x.ndim == 3 else 1))
            step = x.abs().amax(dim=positions, keepdim=True) / 127
            assert torch.all((x - y).abs() <= step / 2 + 1e-6)
            assert (x - y).abs().max() > 0  # quantized, not a copy


def test_fit_head_with_int8_features_scores_as_with_the_cache_s(small_cache, train_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="blobenc")
    exact = fit_head(small_cache, train_data, tmp_path / "f16", [cfg(epochs=4)], progress=False)
    packed = fit_head(small_cache, train_data, tmp_path / "i8", [cfg(epochs=4, feature_dtype="int8")], progress=False)
    assert "in host memory (int8)" in caplog.text
    assert abs(packed["val"]["median_r2"] - exact["val"]["median_r2"]) < 0.005
    out = tmp_path / "x"
    res = CliRunner().invoke(
        app, ["fit-head", str(small_cache), "--data", str(train_data), "--out", str(out), "--set", "feature_dtype=int4"]
    )
    assert res.exit_code == 1 and "feature_dtype='int4': expected one of cache, int8" in res.output
    assert not out.exists()
