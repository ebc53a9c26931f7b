"""The Dataset protocol across layouts: the generic layout end to end, its checks, and the error
gaps of issue #12 (unreadable images, missing ceilings, corrupted checkpoints, mismatched caches)."""

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from blobenc import AlgonautsDataset, ConfigError, DataError, GenericDataset, open_dataset, write_generic
from blobenc.cli import app
from blobenc.data.synth import SynthConfig, write_synthetic
from blobenc.features.extract import ExtractConfig, extract
from blobenc.features.trunk import TrunkSpec
from blobenc.predictions import predict
from blobenc.train.config import FinetuneConfig, HeadConfig, load_config
from blobenc.train.data import SplitTargets
from blobenc.train.fit import fit_head

runner = CliRunner()
TINY = SynthConfig(subjects=3, train_images=30, test_images=6, image_size=32, seed=4)
HEAD = HeadConfig(epochs=3, batch_size=16, hidden_dim=32, proj_dim=40, lr=3e-3, dropout=0.2)
FIT_ARGS = ["--set", "epochs=4", "--set", "batch_size=16", "--set", "hidden_dim=32", "--set", "dropout=0.2"]
FIT_ARGS += ["--set", "lr=3e-3", "--pca-components", "40"]
EXTRACT_ARGS = ["--model", "test_vit", "--no-pretrained", "--layers", "blocks.[13]", "--workers", "0"]


def _extract(data, out, **kw):
    index = open_dataset(data).unique_images()
    cfg = ExtractConfig(trunk=TrunkSpec("test_vit", False), layers=("blocks.[13]",), num_workers=0, **kw)
    extract(index.keys, list(index.paths), out, cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def generic_data(tmp_path_factory):
    """3 subjects in the generic layout: sub-02 with fewer targets, repeated presentations."""
    return write_synthetic(tmp_path_factory.mktemp("generic") / "data", dataclasses.replace(TINY, layout="generic"))


@pytest.fixture(scope="session")
def algonauts_data(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("algonauts") / "data", TINY)


@pytest.fixture(scope="session")
def generic_run(generic_data, tmp_path_factory):
    """A cache and a tiny fit-head run of the generic dataset."""
    root = tmp_path_factory.mktemp("generic-run")
    cache = _extract(generic_data, root / "cache", chunk_images=16)
    fit_head(cache, generic_data, root / "run", [HEAD], progress=False)
    return cache, root / "run"


@pytest.fixture
def generic_copy(generic_data, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(generic_data, dst)
    return dst


# -- both layouts, end to end -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["algonauts", "generic"])
def test_cli_extract_fit_predict_evaluate(layout, generic_data, algonauts_data, tmp_path):
    data = generic_data if layout == "generic" else algonauts_data
    res = runner.invoke(app, ["extract", str(data), "--out", str(tmp_path / "cache"), *EXTRACT_ARGS, "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["fit-head", str(tmp_path / "cache"), "--data", str(data), "--out", str(tmp_path / "run"), *FIT_ARGS]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert np.isfinite(summary["val"]["median_r2"]) and len(summary["val"]["subjects"]) == 3
    res = runner.invoke(app, ["predict", str(tmp_path / "run"), "--data", str(data), "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    ds = open_dataset(data)
    for name, s in ds.subjects.items():
        if layout == "generic":
            arr = np.load(tmp_path / "pred" / name / "pred_test.npy")
            assert arr.shape == (len(s.keys["test"]), s.n_targets) and arr.dtype == np.float32
            with (tmp_path / "pred" / name / "test.csv").open() as f:
                assert [r[0] for r in csv.reader(f)] == ["image", *s.keys["test"]]
        else:
            for hemi in ("lh", "rh"):
                assert np.load(tmp_path / "pred" / name / f"{hemi}_pred_test.npy").shape == (6, s.n_vertices[hemi])
    assert not [p for p in (tmp_path / "pred").iterdir() if p.name.startswith(".")]  # no staging left behind
    out = tmp_path / "scores.json"
    res = runner.invoke(app, ["evaluate", str(tmp_path / "pred"), "--data", str(data), "--json", str(out)])
    assert res.exit_code == 0, res.output
    scores = json.loads(out.read_text())
    assert scores["score"] > 0 and set(scores["subjects"]) == set(ds.subjects)
    assert "score per ROI" in res.output
    if layout == "generic":  # sub-02 is scored on its own, fewer, targets
        assert scores["subjects"]["sub-02"]["n_vertices"] < scores["subjects"]["sub-01"]["n_vertices"]
    res = runner.invoke(app, ["info", str(data)])
    assert res.exit_code == 0 and f"{layout} layout" in res.output


def test_synth_generic_cli(tmp_path):
    res = runner.invoke(
        app,
        [
            "synth",
            str(tmp_path / "g"),
            "--layout",
            "generic",
            "--subjects",
            "2",
            "--train-images",
            "6",
            "--test-images",
            "2",
            "--image-size",
            "16",
        ],
    )
    assert res.exit_code == 0, res.output
    ds = open_dataset(tmp_path / "g")
    assert isinstance(ds, GenericDataset) and list(ds.subjects) == ["sub-01", "sub-02"]
    assert (tmp_path / "g/subjects/sub-02/targets.npy").is_file()
    assert not (tmp_path / "g/subjects/sub-01/targets.npy").exists()
    res = runner.invoke(app, ["synth", str(tmp_path / "h"), "--layout", "nope"])
    assert res.exit_code == 1 and "--layout must be 'algonauts' or 'generic'" in res.output


# -- the generic layout --------------------------------------------------------------------


def test_generic_reader(generic_data):
    ds = open_dataset(generic_data)
    assert isinstance(ds, GenericDataset) and ds.layout == "generic"
    assert ds.group.size == ds.group.n_targets == 640 and ds.group.surface is None
    s1, s2 = ds.subjects["sub-01"], ds.subjects["sub-02"]
    assert s1.n_targets == 640 and s2.n_targets < 640
    np.testing.assert_array_equal(ds.group_index("sub-01"), np.arange(640))
    np.testing.assert_array_equal(ds.group_index("sub-02"), np.load(generic_data / "subjects/sub-02/targets.npy"))
    assert s1.responses("train").shape == (len(s1.keys["train"]), 640)
    assert s1.noise_ceiling().shape == (640,) and 0 <= s1.noise_ceiling().min()
    labels, names = s2.rois()["rois"]
    assert labels.shape == (s2.n_targets,) and names[1] == "early"
    assert any("/" in k for k in ds.unique_images().keys)  # nested image folders


def test_repeated_presentations(generic_data):
    ds = open_dataset(generic_data)
    s = ds.subjects["sub-01"]
    keys = np.asarray(s.keys["train"])
    assert len(set(keys)) < len(keys)  # images repeat across rows
    index = ds.unique_images()
    assert (
        len(index) == len(set(index.keys)) == len({k for t in ds.subjects.values() for v in t.keys.values() for k in v})
    )
    key = next(k for k in keys if (keys == k).sum() > 1)
    rows = np.flatnonzero(keys == key)
    y = s.responses("train", rows)
    assert not np.allclose(y[0], y[1])  # independent noise in each presentation
    split = ds.validation_split(0.2, seed=1)
    for t in ds.subjects.values():  # every row of a held-out image is held out, for every subject
        tr, va = split.rows(t)
        assert not set(np.asarray(t.keys["train"])[tr]) & set(np.asarray(t.keys["train"])[va])
        assert set(np.asarray(t.keys["train"])[va]) <= set(split.val_keys)
    assert ds.validation_split(0.2, seed=1).val_keys.tolist() == split.val_keys.tolist()


def test_missing_targets_are_missing_not_zero(generic_data):
    ds = open_dataset(generic_data)
    data = SplitTargets(ds, ds.validation_split(0.1, 0), torch.device("cpu"))
    i = data.subjects.index("sub-02")
    observed = data.observed("train")
    lacks = np.setdiff1d(np.arange(640), data.group_index["sub-02"])
    assert len(lacks) and not observed[data.sets["train"].subject == i][:, lacks].any()
    assert observed[data.sets["train"].subject != i].all()


def test_one_subject(tmp_path):
    data = write_synthetic(
        tmp_path / "one", SynthConfig(subjects=1, train_images=24, test_images=4, image_size=32, layout="generic")
    )
    ds = open_dataset(data)
    assert list(ds.subjects) == ["sub-01"] and ds.group.n_targets == 640
    cache = _extract(data, tmp_path / "cache")
    summary = fit_head(cache, data, tmp_path / "run", [HEAD], progress=False)
    assert list(summary["val"]["subjects"]) == ["sub-01"]
    scores = predict(tmp_path / "run", data, tmp_path / "pred", progress=False)
    assert scores["sub-01"]["score"] is not None


def test_zarr_responses_equal_npy(generic_data, generic_run, tmp_path):
    import zarr

    cache, _ = generic_run
    data = tmp_path / "zarr"
    shutil.copytree(generic_data, data)
    for name in ("sub-01", "sub-02"):
        y = np.load(data / f"subjects/{name}/train.npy")
        arr = zarr.create_array(
            data / f"subjects/{name}/train.zarr", shape=y.shape, chunks=(7, y.shape[1]), dtype=y.dtype
        )
        arr[:] = y
        (data / f"subjects/{name}/train.npy").unlink()
    ds, ref = open_dataset(data), open_dataset(generic_data)
    rows = np.array([9, 0, 30, 9, 8, 15])  # unsorted, repeated, across chunks
    np.testing.assert_array_equal(
        ds.subjects["sub-02"].responses("train", rows), ref.subjects["sub-02"].responses("train", rows)
    )
    a = fit_head(cache, data, tmp_path / "a", [HEAD], progress=False)
    b = fit_head(cache, generic_data, tmp_path / "b", [HEAD], progress=False)
    assert a["val"] == b["val"]


def test_algonauts_converted_to_generic_scores_the_same(algonauts_data, tmp_path):
    """The same data in both layouts: the same split, PCA, training, validation scores, predictions."""
    algo = AlgonautsDataset(algonauts_data)
    generic = write_generic(algo, tmp_path / "generic", roi_group="streams")
    ds = open_dataset(generic)
    assert ds.group.same_as(algo.group) and ds.group.surface == "fsaverage"
    assert [k.removesuffix(".png") for k in ds.validation_split(0.1, 0).val_keys] == algo.validation_split(
        0.1, 0
    ).val_keys.tolist()
    assert set(ds.subjects["subj01"].parts) == {"lh", "rh"}
    runs = {}
    for name, data in (("algonauts", algonauts_data), ("generic", generic)):
        cache = _extract(data, tmp_path / f"cache-{name}")
        runs[name] = fit_head(cache, data, tmp_path / f"run-{name}", [HEAD], progress=False)
        predict(tmp_path / f"run-{name}", data, tmp_path / f"pred-{name}", progress=False)
    assert runs["generic"]["val"] == runs["algonauts"]["val"]
    assert runs["generic"]["val_rois"]["rois"] == runs["algonauts"]["val_rois"]["streams"]
    for name in algo.subjects:
        lh, rh = (np.load(tmp_path / f"pred-algonauts/{name}/{h}_pred_test.npy") for h in ("lh", "rh"))
        np.testing.assert_array_equal(np.load(tmp_path / f"pred-generic/{name}/pred_test.npy"), np.hstack([lh, rh]))


# -- bad inputs: one DataError line naming the file and row ------------------------------------


def _edit_csv(path, fn):
    rows = list(csv.reader(path.open()))
    rows = fn(rows)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def _save(path, fn):
    np.save(path, fn(np.load(path)))


def _yaml(root, text):
    (root / "dataset.yaml").write_text(text)


BAD = {
    "missing image": (
        lambda d: (d / "images" / list(csv.reader((d / "subjects/sub-01/train.csv").open()))[3][0]).unlink(),
        r"sub-01/train.csv: line \d+: image '.*' not found in .*images",
    ),
    "rows differ": (
        lambda d: _save(d / "subjects/sub-03/train.npy", lambda a: a[:-1]),
        r"sub-03/train.npy: \d+ rows, but train.csv has \d+",
    ),
    "split with no rows": (
        lambda d: _edit_csv(d / "subjects/sub-02/test.csv", lambda r: r[:1]),
        r"sub-02/test.csv: no rows",
    ),
    "unknown column": (
        lambda d: _edit_csv(
            d / "subjects/sub-01/train.csv", lambda r: [[*x, "s1" if i else "session"] for i, x in enumerate(r)]
        ),
        r"sub-01/train.csv: unknown column 'session'; columns: image, optional weight",
    ),
    "targets out of range": (
        lambda d: _save(d / "subjects/sub-02/targets.npy", lambda a: np.where(np.arange(len(a)) == 5, 640, a)),
        r"sub-02/targets.npy: position 5: target 640 is outside the space \[0, 640\)",
    ),
    "n_targets differ from the space": (
        lambda d: (d / "subjects/sub-02/targets.npy").unlink(),
        r"sub-02/train.npy: \d+ targets, but the space has 640 and there is no targets.npy",
    ),
    "n_targets differ, no space": (
        lambda d: (
            _yaml(d, "format: blobenc-generic/1\nimages: images\n"),
            (d / "subjects/sub-02/targets.npy").unlink(),
        ),
        r"train.npy: 640 targets, .*train.npy \d+: without targets.npy every subject's targets must be the same space",
    ),
    "duplicate target": (
        lambda d: _save(d / "subjects/sub-02/targets.npy", lambda a: np.where(np.arange(len(a)) == 9, a[3], a)),
        r"sub-02/targets.npy: position 9: target \d+ appears twice",
    ),
    "wrong format": (lambda d: _yaml(d, "format: blobenc-generic/2\n"), r"dataset.yaml: format 'blobenc-generic/2'"),
    "unknown yaml key": (
        lambda d: _yaml(d, "format: blobenc-generic/1\nspaces: 5\n"),
        r"dataset.yaml: unknown key 'spaces'",
    ),
    "responses without csv": (
        lambda d: (d / "subjects/sub-01/test.csv").unlink(),
        r"sub-01/test.npy: test responses without test.csv",
    ),
    "npy and zarr": (
        lambda d: (d / "subjects/sub-01/train.zarr").mkdir(),
        r"sub-01: both train.npy and train.zarr",
    ),
    "ceiling above 1": (
        lambda d: _save(d / "subjects/sub-03/noise_ceiling.npy", lambda a: np.where(np.arange(len(a)) == 4, 1.5, a)),
        r"sub-03/noise_ceiling.npy: position 4: 1.5 is not a fraction in \[0, 1\]",
    ),
    "rois without names": (
        lambda d: (d / "subjects/sub-01/rois.json").unlink(),
        r"sub-01/rois.npy: comes with rois.json, which is missing",
    ),
    "roi label without name": (
        lambda d: _save(d / "subjects/sub-01/rois.npy", lambda a: np.where(np.arange(len(a)) == 11, 99, a)),
        r"sub-01/rois.npy: position 11: label 99 has no name in rois.json",
    ),
    "negative weight": (
        lambda d: _edit_csv(
            d / "subjects/sub-01/train.csv",
            lambda r: [[*x, "weight" if i == 0 else ("-1" if i == 3 else "1")] for i, x in enumerate(r)],
        ),
        r"sub-01/train.csv: line 4: weight '-1' is not a number >= 0",
    ),
    "key escaping the folder": (
        lambda d: _edit_csv(d / "subjects/sub-03/train.csv", lambda r: [r[0], ["../dataset.yaml"], *r[2:]]),
        r"sub-03/train.csv: line 2: image key '../dataset.yaml' is not a plain relative path",
    ),
    "short line": (
        lambda d: _edit_csv(
            d / "subjects/sub-01/train.csv",
            lambda r: [["image", "weight"], *[[x[0], "1"] for x in r[1:3]], [r[3][0]], *[[x[0], "1"] for x in r[4:]]],
        ),
        r"sub-01/train.csv: line 4: 1 fields, the header has 2",
    ),
    "no training responses": (
        lambda d: (d / "subjects/sub-03/train.npy").unlink(),
        r"sub-03: no training responses \(train.npy or train.zarr\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_generic_inputs(generic_copy, case):
    breaks, message = BAD[case]
    breaks(generic_copy)
    with pytest.raises(DataError, match=message):
        open_dataset(generic_copy)


def test_responses_are_checked_on_first_read_not_when_the_dataset_opens(generic_copy):
    path = generic_copy / "subjects/sub-01/test.npy"
    _save(path, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 2 * a.shape[1] + 7, np.nan, a))
    subject = open_dataset(generic_copy).subjects["sub-01"]  # opening reads headers, not 12 GB of responses
    assert subject.responses("train").shape[0] == len(subject.keys["train"])
    for _ in range(2):  # each read of the damaged file says so, not only the first
        with pytest.raises(DataError, match=r"sub-01/test.npy: row 2 \(test.csv line 4\), target 7: nan is not a"):
            subject.responses("test", np.array([0]))


def test_bad_input_is_one_line_on_the_cli(generic_copy, tmp_path):
    (generic_copy / "subjects/sub-02/targets.npy").unlink()
    for args in (
        ["info", str(generic_copy)],
        ["extract", str(generic_copy), "--out", str(tmp_path / "c"), *EXTRACT_ARGS],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 1, res.output
        assert res.output.strip().startswith("error:") and "Traceback" not in res.output
        assert "no targets.npy" in res.output
    assert not (tmp_path / "c").exists()  # nothing written before the data were checked


def test_duplicate_subject(generic_data):
    with pytest.raises(DataError, match="subject 'sub-01' is given twice"):
        open_dataset(generic_data, subjects=["sub-01", "sub-01"])
    assert list(open_dataset(generic_data, subjects=["sub-03"]).subjects) == ["sub-03"]


def test_evaluate_checks_the_row_keys(generic_data, generic_run, tmp_path):
    _, run = generic_run
    pred = tmp_path / "pred"
    predict(run, generic_data, pred, progress=False)
    _edit_csv(pred / "sub-01/test.csv", lambda r: [r[0], next(x for x in r[2:] if x != r[1]), *r[2:]])
    res = runner.invoke(app, ["evaluate", str(pred), "--data", str(generic_data)])
    assert res.exit_code == 1 and "sub-01/test.csv: line 2: rows differ" in res.output
    (pred / "sub-01").rename(pred / "sub-09")
    res = runner.invoke(app, ["evaluate", str(pred), "--data", str(generic_data)])
    assert res.exit_code == 1 and "sub-09: subject not in the data" in res.output


def test_predict_images_folder_generic(generic_data, generic_run, tmp_path):
    """Any folder of images, for every subject, in its own target order, keys beside the rows."""
    _, run = generic_run
    folder = tmp_path / "imgs"
    (folder / "a").mkdir(parents=True)
    for i, key in enumerate(open_dataset(generic_data).unique_images().keys[:3]):
        shutil.copyfile(generic_data / "images" / key, folder / "a" / f"x{i}.png")
    predict(run, generic_data, tmp_path / "pred", images=folder, progress=False)
    ds = open_dataset(generic_data)
    assert (tmp_path / "pred/images.txt").read_text().split() == ["a/x0.png", "a/x1.png", "a/x2.png"]
    for name, s in ds.subjects.items():
        assert np.load(tmp_path / "pred" / name / "pred_images.npy").shape == (3, s.n_targets)
        assert (tmp_path / "pred" / name / "images.csv").read_text().split() == [
            "image",
            "a/x0.png",
            "a/x1.png",
            "a/x2.png",
        ]


def test_predict_error_part_way_leaves_out_as_it_was(generic_data, generic_run, tmp_path, monkeypatch):
    import blobenc.predictions as predict_mod

    _, run = generic_run
    out = tmp_path / "pred"
    predict(run, generic_data, out, subjects="sub-03", progress=False)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    real, calls = predict_mod.score_subject, []

    def fail_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise DataError("disk full")
        return real(*args)

    monkeypatch.setattr(predict_mod, "score_subject", fail_on_second)
    with pytest.raises(DataError, match="disk full"):
        predict(run, generic_data, out, progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # sub-01 was not written either
    calls.clear()
    with pytest.raises(DataError, match="disk full"):
        predict(run, generic_data, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_submit_is_for_the_challenge_layout(generic_data, generic_run, tmp_path):
    _, run = generic_run
    predict(run, generic_data, tmp_path / "pred", progress=False)
    res = runner.invoke(
        app, ["submit", str(tmp_path / "pred"), "--data", str(generic_data), "--out", str(tmp_path / "s.zip")]
    )
    assert res.exit_code == 1 and "submit packages the Algonauts 2023 challenge layout" in res.output


# -- error gaps (issue #12) ---------------------------------------------------------------------


def test_scores_without_noise_ceiling(generic_data, generic_run, tmp_path):
    """Test responses but no ceiling: r and R², no noise-normalized score, nothing raised."""
    _, run = generic_run
    data = tmp_path / "data"
    shutil.copytree(generic_data, data)
    for p in data.glob("subjects/*/noise_ceiling.npy"):
        p.unlink()
    out = tmp_path / "p.json"
    res = runner.invoke(
        app, ["predict", str(run), "--data", str(data), "--out", str(tmp_path / "pred"), "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    scores = json.loads(out.read_text())
    assert scores["score"] is None and scores["subjects"]["sub-01"]["score"] is None
    assert -1 <= scores["median_r"] <= 1 and scores["subjects"]["sub-01"]["rois_metric"] == "r"
    res = runner.invoke(app, ["evaluate", str(tmp_path / "pred"), "--data", str(data)])
    text = " ".join(res.output.split())  # titles wrap
    assert res.exit_code == 0 and "(no noise ceilings)" in text and "Pearson r per ROI" in text


def test_predict_refuses_a_cache_that_does_not_fit_the_run(generic_data, generic_run, tmp_path):
    _, run = generic_run
    pooled = _extract(generic_data, tmp_path / "pooled", pool=2)
    res = runner.invoke(
        app, ["predict", str(run), "--data", str(generic_data), "--out", str(tmp_path / "p"), "--cache", str(pooled)]
    )
    assert res.exit_code == 1 and "pooled: not the features the run was trained on: pool 2 vs None;" in res.output
    assert "layer blocks.1 shape [5, 64] vs [101, 64]" in res.output
    assert not (tmp_path / "p").exists()


def test_truncated_checkpoint_is_one_line(generic_run, generic_data, tmp_path):
    _, run = generic_run
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    data = (bad / "best.safetensors").read_bytes()
    (bad / "best.safetensors").write_bytes(data[: len(data) // 2])
    res = runner.invoke(app, ["predict", str(bad), "--data", str(generic_data), "--out", str(tmp_path / "p")])
    assert res.exit_code == 1 and "best.safetensors: not a readable safetensors checkpoint" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "p").exists()


def test_unreadable_image_stops_before_anything_is_written(generic_data, generic_run, tmp_path):
    _, run = generic_run
    data = tmp_path / "data"
    shutil.copytree(generic_data, data)
    broken = data / "images" / open_dataset(data).subjects["sub-01"].keys["train"][0]
    broken.write_bytes(b"not a png")
    args = ["finetune", str(run), "--data", str(data), "--out", str(tmp_path / "ft"), "--set", "epochs=1"]
    res = runner.invoke(app, [*args, "--set", "num_workers=0"])
    assert res.exit_code == 1 and f"{broken}: cannot read image" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "ft/run.json").exists() and not (tmp_path / "ft/split.json").exists()
    with pytest.raises(DataError, match=f"{broken}: cannot read image"):  # the trunk would read it
        predict(run, data, tmp_path / "p", split="train", use_cache=False, progress=False)
    assert not (tmp_path / "p").exists()
    predict(run, data, tmp_path / "p", split="train", progress=False)  # the cache has its features


def test_image_that_fails_to_decode_mid_run_is_one_line(generic_data, generic_run, tmp_path):
    """A PNG whose header opens but whose data is cut: finetune stops with its path, no traceback."""
    _, run = generic_run
    data = tmp_path / "data"
    shutil.copytree(generic_data, data)
    broken = data / "images" / open_dataset(data).subjects["sub-01"].keys["train"][0]
    png = broken.read_bytes()
    broken.unlink()  # the copy may be a hard link to the session's dataset
    broken.write_bytes(png[: len(png) // 2])
    args = ["finetune", str(run), "--data", str(data), "--out", str(tmp_path / "ft"), "--set", "epochs=1"]
    res = runner.invoke(app, [*args, "--set", "num_workers=0", "--set", "batch_size=16", "-q"])
    assert res.exit_code == 1, res.output
    assert f"{broken}: cannot read image" in res.output and "Traceback" not in res.output
    assert "rerun with --resume" in res.output  # it stopped mid-run, the header check passed


def test_finetune_config_refuses_keys_it_ignores():
    with pytest.raises(ConfigError, match="config key 'hidden_dim': finetune takes it from the fit-head run"):
        load_config(None, ["hidden_dim=64"], cls=FinetuneConfig)
    with pytest.raises(ConfigError, match="config key 'feature_dtype': finetune reads images, not cached features"):
        load_config(None, ["feature_dtype=int8"], cls=FinetuneConfig)
    with pytest.raises(ConfigError, match=r"min_lr_fraction=1.5: expected a fraction in \[0, 1\]"):
        load_config(None, ["min_lr_fraction=1.5"])
    assert load_config(None, ["min_lr_fraction=1"]).min_lr_fraction == 1


def test_algonauts_without_noise_ceiling_scores_r(data_copy, tmp_path):
    """Algonauts test fMRI without ceiling files: evaluate gives r and R², the same r as with them."""
    ds = AlgonautsDataset(data_copy)
    rng = np.random.default_rng(0)
    for name, s in ds.subjects.items():
        y = s.responses("test")
        ds.write_predictions(tmp_path / "pred", name, (y + rng.normal(size=y.shape)).astype(np.float32))
    with_nc = runner.invoke(
        app, ["evaluate", str(tmp_path / "pred"), "--data", str(data_copy), "--json", str(tmp_path / "a.json")]
    )
    for p in data_copy.glob("subj*/test_split/noise_ceiling/*.npy"):
        p.unlink()
    without = runner.invoke(
        app, ["evaluate", str(tmp_path / "pred"), "--data", str(data_copy), "--json", str(tmp_path / "b.json")]
    )
    assert with_nc.exit_code == without.exit_code == 0, without.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["score"] > 0 and b["score"] is None and b["subjects"]["subj01"]["n_zero_nc"] is None
    assert (
        b["median_r"] == a["median_r"] and b["subjects"]["subj02"]["median_r2"] == a["subjects"]["subj02"]["median_r2"]
    )
    assert set(b["subjects"]["subj01"]["rois"]["prf-visualrois"]["V1v"]) == {"lh", "rh"}
