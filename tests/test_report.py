"""`blobenc report`: run loading, the fsaverage5 mapping, figure data, the CLI, bad inputs, and the page
in a real (headless) browser."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from blobenc import AlgonautsDataset
from blobenc.cli import app
from blobenc.features.extract import ExtractConfig, extract
from blobenc.features.trunk import TrunkSpec
from blobenc.train.config import HeadConfig
from blobenc.train.fit import fit_head

pytest.importorskip("matplotlib")
pytest.importorskip("nilearn")
pytest.importorskip("jinja2")

from blobenc.reporting import (
    ReportError,
    figures,
    read_run,
    require_extra,
    write_report,
)
from blobenc.reporting.page import Page
from blobenc.reporting.scores import layer_preference, vertex_scores
from blobenc.reporting.surface import FSAVERAGE5, coarse_neighbours, fsaverage5, to_fsaverage5

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from blobenc.data.synth import SynthConfig, write_synthetic

    return write_synthetic(
        tmp_path_factory.mktemp("rep") / "data",
        SynthConfig(subjects=3, train_images=60, test_images=10, image_size=32, seed=5),
    )


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A tiny fit-head run (3 epochs) and its test predictions."""
    root = tmp_path_factory.mktemp("rep-run")
    index = AlgonautsDataset(data).unique_images()
    cfg = ExtractConfig(trunk=TrunkSpec("test_vit", False), layers=("blocks.[13]",), num_workers=0, chunk_images=32)
    extract(index.keys, list(index.paths), root / "cache", cfg, progress=False)
    head = HeadConfig(epochs=3, batch_size=32, hidden_dim=32, proj_dim=40, lr=3e-3, dropout=0.2)
    fit_head(root / "cache", data, root / "run", [head], progress=False)
    res = runner.invoke(app, ["predict", str(root / "run"), "--data", str(data), "--out", str(root / "pred"), "-q"])
    assert res.exit_code == 0, res.output
    return root / "run"


@pytest.fixture(scope="module")
def report(run, data, tmp_path_factory):
    """Two runs (the run and a copy of it) with their predictions, through the CLI."""
    root = tmp_path_factory.mktemp("rep-page")
    other = root / "run-b"
    shutil.copytree(run, other)
    out = root / "report.html"
    pred = str(run.parent / "pred")
    args = ["report", str(run), str(other), "--data", str(data), "--predictions", pred, "--predictions", pred]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_fsaverage5_mapping_of_a_known_mask():
    hemi = 163842  # full fsaverage: fsaverage5 is its first 10,242 vertices
    lh, rh = np.array([5, 100, 10241, 10242, 163841]), np.array([0, 7, 20000])
    targets = np.concatenate([lh, rh + hemi])
    values = np.arange(1.0, len(targets) + 1)
    maps = to_fsaverage5(values, targets, hemi)
    assert maps["lh"].shape == maps["rh"].shape == (FSAVERAGE5,)
    assert maps["lh"][[5, 100, 10241]].tolist() == [1, 2, 3]  # 10242 and 163841 are finer than fsaverage5
    assert maps["rh"][[0, 7]].tolist() == [6, 7]
    assert np.isfinite(maps["lh"]).sum() == 3 and np.isfinite(maps["rh"]).sum() == 2

    # a coarser space (fsaverage4, as the small synthetic data): its vertices are fsaverage5's first
    # 2,562, and every added vertex lies midway between its two nearest coarse ones
    small = 2562
    sphere = np.asarray(fsaverage5()["sphere"]["lh"].coordinates, dtype=np.float64)
    x = sphere[:small, 0]
    maps = to_fsaverage5(np.concatenate([x, x]), np.concatenate([np.arange(small), np.arange(small) + small]), small)
    assert np.array_equal(maps["lh"][:small], x)
    fine = maps["lh"][small:]
    assert np.isfinite(fine).all()
    assert np.abs(fine - sphere[small:, 0]).max() < 0.05 * np.ptp(x)  # the midpoint's own coordinate
    assert coarse_neighbours(small)["lh"].shape == (FSAVERAGE5 - small, 2)


def test_subject_mask_lands_on_fsaverage5(data):
    ds = AlgonautsDataset(data)
    s = ds.subjects["subj02"]
    values = np.arange(s.n_vertices_total, dtype=float)
    maps = to_fsaverage5(values, s.targets, ds.space_size // 2)
    lh = np.flatnonzero(s.fsaverage_masks["lh"])
    rh = np.flatnonzero(s.fsaverage_masks["rh"])
    assert np.array_equal(maps["lh"][lh], values[: len(lh)])  # native order: lh vertices ascending, then rh
    assert np.array_equal(maps["rh"][rh], values[len(lh) :])


def test_figure_data_equals_the_run_scores(run, data):
    loaded = read_run(run)
    assert loaded.kind == "fit-head" and not loaded.incomplete, loaded.notes
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fig = figures.curves_figure([(t.name, t.metrics, t.best) for t in loaded.trials])
    loss, r2, mean_r = fig.axes
    assert loss.lines[0].get_ydata().tolist() == [m["train_loss"] for m in metrics]
    assert r2.lines[0].get_ydata().tolist() == [m["val"]["median_r2"] for m in metrics]
    assert mean_r.lines[0].get_ydata().tolist() == [m["val"]["mean_r"] for m in metrics]
    assert r2.lines[0].get_xdata().tolist() == [1, 2, 3]

    stored = load_file(run / "val_vertex.safetensors")
    scores = vertex_scores(loaded, "val_r")
    for name, v in scores.items():
        assert np.array_equal(v, stored[f"{name}.r"].astype(np.float64))
    bins = np.linspace(-1, 1, 41)
    hist = figures.histogram_figure(scores, "r", bins)
    for outline, v in zip(hist.axes[0].patches, scores.values(), strict=True):  # one step outline per subject
        assert outline.get_xy()[1:-1:2, 1].tolist() == np.histogram(v, bins)[0].tolist()

    page = Page([loaded], AlgonautsDataset(data), str(data))
    table = page.roi_table()
    summary = json.loads((run / "summary.json").read_text())
    v1v = next(r for r in table["rows"] if r["roi"] == "V1v")
    assert [c["text"] for c in v1v["cells"]] == [
        f"{summary['val_rois']['prf-visualrois']['V1v'][h]:.3f}" for h in ("lh", "rh")
    ]
    subjects = page.subjects_table()
    assert [r["cells"][0] for r in subjects["rows"]] == [
        f"{summary['val']['subjects'][n]['median_r2']:.4f}" for n in ("subj01", "subj02", "subj03")
    ]


def test_cli_report_two_runs(report, run, data):
    out, output = report
    html = out.read_text()
    assert "wrote" in output and out.is_file()
    assert not list(out.parent.glob(".*.tmp"))  # written through a temporary name
    assert not re.search(r"<(script|link)\b", html) and "http://" not in html and "https://" not in html
    uris = re.findall(r'src="data:image/png;base64,', html)
    # 2 curves + 2 histograms + 2 maps + 2 per-subject grids + 1 difference + 1 noise ceiling
    assert len(uris) == 10
    from blobenc.predictions import evaluate

    score = evaluate(run.parent / "pred", AlgonautsDataset(data))["score"]
    assert f"{score:.2f} % (noise-normalized)" in html
    assert "ROIs won" in html and "tie" in html  # a copy ties its original everywhere
    assert "Incomplete" not in html


def test_layer_preference_of_a_banded_ridge_run(run, data, tmp_path):
    ridge = tmp_path / "ridge"
    shutil.copytree(run, ridge)
    info = json.loads((run / "run.json").read_text()) | {"kind": "fit-ridge"}
    (ridge / "run.json").write_text(json.dumps(info))
    ds = AlgonautsDataset(data)
    (ridge / "weights").mkdir()
    rng = np.random.default_rng(0)
    weights = {}
    for name, s in ds.subjects.items():
        w = rng.random((s.n_vertices_total, 2))
        w[: s.n_vertices["lh"], 1] += 2  # the left hemisphere prefers layer 1, the right layer 0
        w[s.n_vertices["lh"] :, 0] += 2
        weights[name] = w
        save_file({"layer_weights": w.astype(np.float32)}, str(ridge / "weights" / f"{name}.safetensors"))
    (ridge / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"subject": n, "solver": "banded", "alpha_median": 10.0, "seconds": 1.0}) + "\n"
            for n in ds.subjects
        )
    )
    loaded = read_run(ridge)
    assert [r["subject"] for r in loaded.ridge_rows] == list(ds.subjects)
    pref = layer_preference(loaded, ds)
    assert set(np.unique(pref["lh"][np.isfinite(pref["lh"])])) == {1.0}
    assert set(np.unique(pref["rh"][np.isfinite(pref["rh"])])) == {0.0}
    assert Page([loaded], ds, str(data)).curves()[0]["ridge"][0]["solver"] == "banded"
    fig = figures.layer_figure(pref, ["blocks.1", "blocks.3"])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["blocks.1", "blocks.3"]


def test_bad_inputs(run, data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["report", str(empty), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and "not a blobenc run" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and "run folder not found" in res.output
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r.txt")])
    assert res.exit_code == 1 and "must end in .html" in res.output
    res = runner.invoke(
        app, ["report", str(run), "--out", str(tmp_path / "r.html"), "--predictions", "a", "--predictions", "b"]
    )
    assert res.exit_code == 1 and "2 predictions folders for 1 runs" in res.output

    other = tmp_path / "other"  # "another dataset": a different vertex space
    shutil.copytree(run, other)
    spec = json.loads((other / "model.json").read_text())
    group = spec["group"]
    if "index" in group:
        group["index"] = group["index"][1:]
    else:
        group["lh"]["fsaverage_index"] = group["lh"]["fsaverage_index"][1:]
    (other / "model.json").write_text(json.dumps(spec))
    res = runner.invoke(app, ["report", str(run), str(other), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and "different datasets" in res.output
    res = runner.invoke(app, ["report", str(other), "--data", str(data), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and "another dataset" in res.output
    assert not (tmp_path / "r.html").exists()


def test_interrupted_run_is_reported_as_incomplete(run, data, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write
    (cut / "summary.json").write_text(json.dumps({"best_epoch": 0, "val": json.loads(lines[0])["val"], "trial": "run"}))
    (cut / "val_vertex.safetensors").unlink()
    loaded = read_run(cut)
    assert loaded.incomplete and len(loaded.trials[0].metrics) == 1
    assert any("line 2 is not valid JSON" in n for n in loaded.notes)
    assert any("1 of 3 epochs" in n for n in loaded.notes)
    out = write_report([cut], tmp_path / "cut.html", data, subject_maps=False)
    html = out.read_text()
    assert "Incomplete" in html and "1 of 3 epochs recorded" in html


def test_missing_extra_is_one_line(monkeypatch, run, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(ReportError, match=r"pip install 'blobenc\[report\]'"):
        require_extra()
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 1 and "pip install 'blobenc[report]'" in res.output


def _chromium() -> str | None:
    return next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)


CHECK = """<script>
window.addEventListener("error", e => (window.__errors = window.__errors || []).push(String(e.message)));
window.addEventListener("load", () => {
  const box = document.querySelector("figure.surface img").getBoundingClientRect();
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({
    images: [...document.images].map(i => [i.naturalWidth, i.naturalHeight, i.complete]),
    surface: [box.left + scrollX, box.top + scrollY, box.width, box.height],
    errors: window.__errors || [],
  });
  document.body.appendChild(out);
});
</script>"""


def test_page_in_headless_chromium(report, tmp_path):
    from PIL import Image

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    out, _ = report
    page = tmp_path / "page.html"
    page.write_text(out.read_text().replace("</body>", CHECK + "</body>"))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    width = 1400
    dom = subprocess.run(
        [browser, *flags, f"--window-size={width},1000", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="check">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["errors"] == []
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and ("rror" in line or "Uncaught" in line)]
    assert console == []
    assert len(check["images"]) == 10 and all(w > 0 and h > 0 and done for w, h, done in check["images"])

    x, y, w, h = (round(v) for v in check["surface"])
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, f"--window-size={width},{y + h + 40}", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    region = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)[y : y + h, x : x + w]
    assert region.shape[0] > 100 and region.shape[1] > 300
    assert region.std() > 20  # brains on white, not a blank box
    assert (region < 200).mean() > 0.1


def test_fit_head_report_flag_writes_the_run_report(run, data, tmp_path):
    """`fit-head --report` ends by writing RUN/report.html of that run (the cache of the fixture run)."""
    cache = run.parent / "cache"
    out = tmp_path / "run"
    args = ["fit-head", str(cache), "--data", str(data), "--out", str(out), "--report", "-q"]
    tiny = ["--set", "epochs=2", "--set", "batch_size=32", "--set", "hidden_dim=16", "--pca-components", "20"]
    res = runner.invoke(app, [*args, *tiny])
    assert res.exit_code == 0, res.output
    html = (out / "report.html").read_text()
    assert "fit-head" in html and "data:image/png;base64," in html
