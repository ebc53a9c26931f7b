import json
import zipfile

import numpy as np
import pytest
from scipy.stats import pearsonr
from typer.testing import CliRunner

from blobenc import AlgonautsDataset
from blobenc.cli import app

runner = CliRunner()


def write_preds(ds: AlgonautsDataset, out, noise=1.0, seed=0):
    """Noisy copies of the test fMRI: a predictor with a known, positive score."""
    rng = np.random.default_rng(seed)
    for name, s in ds.subjects.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        for hemi in ("lh", "rh"):
            y = np.asarray(s.fmri("test", hemi))
            np.save(out / name / f"{hemi}_pred_test.npy", (y + noise * rng.normal(size=y.shape)).astype(np.float32))
    return out


def devkit_score(ds: AlgonautsDataset, pred_dir):
    """An independent implementation of the Algonauts 2023 devkit formula, vertex by vertex."""
    scores, nonzero = {}, {}
    for name, s in ds.subjects.items():
        per_vertex, has_nc = [], []
        for hemi in ("lh", "rh"):
            pred = np.load(pred_dir / name / f"{hemi}_pred_test.npy")
            fmri = np.load(s.path / f"test_split/test_fmri/{hemi}_test_fmri.npy")
            nc = np.load(s.path / f"test_split/noise_ceiling/{hemi}_noise_ceiling.npy").astype(np.float64)
            corr = pearsonr(pred.astype(np.float64), fmri.astype(np.float64), axis=0)[0]
            corr[corr < 0] = 0
            has_nc.append(nc > 0)
            nc[nc == 0] = 1e-14
            nna = corr**2 / nc * 100
            nna[nna > 100] = 100
            per_vertex.append(nna)
        scores[name] = float(np.mean(np.concatenate(per_vertex)))
        nonzero[name] = float(np.mean(np.concatenate(per_vertex)[np.concatenate(has_nc)]))
    return scores, nonzero


def test_evaluate_matches_devkit(small_data, tmp_path):
    ds = AlgonautsDataset(small_data)
    preds = write_preds(ds, tmp_path / "pred")
    res = runner.invoke(app, ["evaluate", str(preds), "--data", str(small_data), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    assert "subj08" in res.output and "score per ROI" in res.output
    got = json.loads((tmp_path / "s.json").read_text())
    expected, expected_nonzero = devkit_score(ds, preds)
    for name, score in expected.items():
        assert got["subjects"][name]["score"] == pytest.approx(score, rel=1e-6)
        assert got["subjects"][name]["score_nonzero_nc"] == pytest.approx(expected_nonzero[name], rel=1e-6)
    assert got["score"] == pytest.approx(np.mean(list(expected.values())), rel=1e-6)
    s1 = got["subjects"]["subj01"]
    assert 0 < s1["score"] < 100 and s1["median_r"] > 0
    assert s1["n_zero_nc"] > 0  # synthetic pure-noise vertices: the nonzero variant is exercised
    assert set(s1["rois"]) >= {"prf-visualrois", "streams"}
    assert set(s1["rois"]["prf-visualrois"]["V1v"]) == {"lh", "rh"}


def test_evaluate_full_vertices_matches_devkit(full_data, tmp_path):
    ds = AlgonautsDataset(full_data)
    preds = write_preds(ds, tmp_path / "pred", noise=0.5)
    res = runner.invoke(app, ["evaluate", str(preds), "--data", str(full_data), "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "s.json").read_text())
    for name, score in devkit_score(ds, preds)[0].items():
        assert got["subjects"][name]["score"] == pytest.approx(score, rel=1e-6)


def test_evaluate_quiet_prints_score(small_data, tmp_path):
    preds = write_preds(AlgonautsDataset(small_data), tmp_path / "pred")
    res = runner.invoke(app, ["evaluate", str(preds), "--data", str(small_data), "--quiet"])
    assert res.exit_code == 0 and float(res.output.strip()) > 0


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda a: a[:-1], r"expected shape \(6, \d+\) \(images x lh vertices\), found \(5, \d+\)"),
        (lambda a: a.astype(np.float64), "expected dtype float32, found float64"),
        (lambda a: np.where(np.arange(a.shape[1]) == 3, np.inf, a).astype(np.float32), "NaN or inf"),
    ],
)
def test_bad_prediction(small_data, tmp_path, damage, message):
    preds = write_preds(AlgonautsDataset(small_data), tmp_path / "pred")
    path = preds / "subj03" / "lh_pred_test.npy"
    np.save(path, damage(np.load(path)))
    for cmd in (
        ["evaluate", str(preds), "--data", str(small_data)],
        ["submit", str(preds), "--data", str(small_data), "--out", str(tmp_path / "s.zip")],
    ):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 1
        assert "subj03/lh_pred_test.npy" in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert __import__("re").search(message, res.output)
    assert not (tmp_path / "s.zip").exists()


def test_missing_prediction_and_unknown_subject(small_data, tmp_path):
    preds = write_preds(AlgonautsDataset(small_data), tmp_path / "pred")
    (preds / "subj02" / "rh_pred_test.npy").unlink()
    res = runner.invoke(app, ["evaluate", str(preds), "--data", str(small_data)])
    assert res.exit_code == 1 and "subj02/rh_pred_test.npy: prediction file not found" in res.output
    (preds / "subj02").rename(preds / "subj42")
    res = runner.invoke(app, ["evaluate", str(preds), "--data", str(small_data)])
    assert res.exit_code == 1 and "subj42: subject not in the data" in res.output


def test_submit_zip_layout(small_data, tmp_path):
    preds = write_preds(AlgonautsDataset(small_data), tmp_path / "pred")
    res = runner.invoke(app, ["submit", str(preds), "--data", str(small_data), "--out", str(tmp_path / "sub.zip")])
    assert res.exit_code == 0, res.output
    with zipfile.ZipFile(tmp_path / "sub.zip") as zf:
        names = sorted(zf.namelist())
        assert len(names) == 16
        assert names[0] == "algonauts_2023_challenge_submission/subj01/lh_pred_test.npy"
        with zf.open(names[0]) as f:
            np.testing.assert_array_equal(np.load(f), np.load(preds / "subj01/lh_pred_test.npy"))


def test_submit_needs_every_subject(small_data, tmp_path):
    preds = write_preds(AlgonautsDataset(small_data), tmp_path / "pred")
    (preds / "subj07/lh_pred_test.npy").unlink()
    res = runner.invoke(app, ["submit", str(preds), "--data", str(small_data), "--out", str(tmp_path / "s.zip")])
    assert res.exit_code == 1 and "subj07/lh_pred_test.npy: prediction file not found" in res.output


def test_cli_bad_data_root(tmp_path):
    res = runner.invoke(app, ["evaluate", str(tmp_path), "--data", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "missing: data folder not found" in res.output and "Traceback" not in res.output


def test_synth_refuses_nonempty_folder(small_data):
    res = runner.invoke(app, ["synth", str(small_data)])
    assert res.exit_code == 1 and "folder exists and is not empty" in res.output


def test_subprocess_entry_point(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "blobenc", "--help"], capture_output=True, text=True, check=True)
    assert "extract" in res.stdout or "synth" in res.stdout
