"""The Python API (blobenc.api, exported at the top level) and the Encoder every run loads as."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import blobenc
from blobenc import ConfigError, Encoder, open_dataset

TINY = {"epochs": 2, "batch_size": 32, "hidden_dim": 32, "lr": 3e-3, "dropout": 0.2}


def test_import_blobenc_does_not_import_torch():
    """A notebook's `import blobenc` is instant; torch comes with the first function that needs it."""
    code = "import sys, blobenc; blobenc.fit_head; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.fixture(scope="module")
def api_runs(small_cache, train_data, tmp_path_factory):
    """A fit-head run and a fit-ridge run, made through the API."""
    root = tmp_path_factory.mktemp("api")
    head = blobenc.fit_head(
        small_cache, train_data, root / "head", settings=TINY, pca_components=40, device="cpu", progress=False
    )
    ridge = blobenc.fit_ridge(small_cache, train_data, root / "ridge", device="cpu", progress=False)
    return root, head, ridge


def test_api_runs_are_the_cli_runs(api_runs):
    root, head, ridge = api_runs
    cfg = json.loads((root / "head" / "run.json").read_text())["configs"][0]
    assert {k: cfg[k] for k in TINY} == TINY and cfg["proj_dim"] == 40 and cfg["device"] == "cpu"
    assert head["val"]["median_r2"] > 0 and ridge["val"]["median_r2"] > 0


@pytest.mark.parametrize("run", ["head", "ridge"])
def test_encoder_predict_equals_the_predict_command(api_runs, train_data, tmp_path, run):
    root, _, _ = api_runs
    encoder = blobenc.load_run(root / run)
    assert isinstance(encoder, Encoder) and encoder.subjects == ["subj01", "subj02", "subj03"]
    scores = blobenc.predict(root / run, train_data, tmp_path / "pred", device="cpu", progress=False)
    ds = open_dataset(train_data)
    evaluated = blobenc.evaluate(tmp_path / "pred", ds)["subjects"]
    for name, subject in ds.subjects.items():
        written = ds.read_predictions(tmp_path / "pred", name)
        got = encoder.predict(subject)  # its test images, from the run's cache
        assert got.shape == (len(subject.keys["test"]), subject.n_targets)
        np.testing.assert_array_equal(got, written)
        assert scores[name]["median_r"] == evaluated[name]["median_r"]


def test_encoder_predicts_files_folders_and_arrays_alike(api_runs, train_data, tmp_path):
    root, _, _ = api_runs
    encoder = blobenc.load_run(root / "head")
    subject = open_dataset(train_data).subjects["subj02"]
    paths = list(subject.images["test"][:4])
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, p in enumerate(paths):
        (folder / f"{k}.png").write_bytes(p.read_bytes())
    from_files = encoder.predict(subject, images=paths)  # no cache key: the trunk reads them
    np.testing.assert_array_equal(encoder.predict(subject, images=arrays), from_files)
    np.testing.assert_array_equal(encoder.predict(subject, images=folder), from_files)
    cached = encoder.predict(subject)[:4]
    np.testing.assert_allclose(from_files, cached, rtol=1e-3, atol=1e-3)  # the trunk rounds as the cache did
    with pytest.raises(blobenc.BlobencError, match="image 0: cannot read image \\(expected an \\(H, W, 3\\) uint8"):
        encoder.predict(subject, images=arrays.astype(np.float32))


def test_settings_and_sweeps_as_python_values(small_cache, train_data, tmp_path):
    summary = blobenc.fit_head(
        small_cache,
        train_data,
        tmp_path / "sweep",
        settings=TINY | {"epochs": 1, "layers": ["blocks.3"]},
        sweep={"lr": [1e-3, 3e-3]},
        pca_components=40,
        device="cpu",
        progress=False,
    )
    configs = [t["config"] for t in summary["trials"]]
    assert sorted(c["lr"] for c in configs) == [1e-3, 3e-3] and all(c["layers"] == ["blocks.3"] for c in configs)
    with pytest.raises(ConfigError, match="--max-memory '8Q': expected a size such as 512M or 8G"):
        blobenc.fit_head(small_cache, train_data, tmp_path / "x", max_memory="8Q")
