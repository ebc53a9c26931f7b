"""Faults and bad input: each answered in one line naming the culprit, a non-zero exit, no
traceback, and what was written before left byte-identical (or, for resume and repair, equal to
an uninterrupted run). Full disks and read-only folders are real: a small tmpfs mounted where the
tests run as root, else the test is skipped."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import TINY_ARGS
from typer.testing import CliRunner

from blobenc.cli import app
from blobenc.features.cache import FeatureCache
from blobenc.train.runfolder import RunFolder

runner = CliRunner()
FAST = [*TINY_ARGS, "--set", "epochs=2", "--device", "cpu"]


def one_line_error(res, *needles: str) -> str:
    """The command failed with one 'error:' line holding every needle, and no traceback."""
    out = res.output
    assert res.exit_code == 1, out
    assert isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    text = " ".join(out.split())  # rich wraps long lines
    for needle in needles:
        assert needle in text, (needle, out)
    return text


def digest(folder: Path, skip: tuple[str, ...] = ("log.txt",)) -> dict[str, str]:
    """Every file under `folder` (but `skip`) with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("needs root and mount for a real small filesystem")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def cache_copy(small_cache, tmp_path) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(small_cache, dst)
    return dst


def extract_args(train_data, out):  # small_cache's command
    return ["extract", str(train_data), "--out", str(out), "--model", "test_vit", "--no-pretrained",
            "--layers", "blocks.[13]", "--workers", "0", "--chunk-images", "16", "--device", "cpu", "-q"]  # fmt: skip


def chunk_file(cache: Path, layer: str, c: int) -> Path:
    arr = zarr.open_group(cache, mode="r")[layer]
    return cache / layer / arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))


# --- damaged caches ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove-file", "remove-layer"])
def test_a_damaged_cache_is_named_by_every_reader_and_extract_mends_exactly_it(
    damage, cache_copy, small_cache, train_data, tmp_path
):
    before = digest(cache_copy)
    target = chunk_file(cache_copy, "blocks.1", 1)
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "remove-file":
        target.unlink()
    else:
        shutil.rmtree(cache_copy / "blocks.1")

    res = runner.invoke(app, ["info", str(cache_copy), "--verify", "-q"])
    if damage == "remove-layer":
        one_line_error(res, "blocks.1", "missing", "extract")
    else:
        one_line_error(res, "damaged", "layer 'blocks.1': chunk(s) 1", "extract")
    res = runner.invoke(app, ["fit-ridge", str(cache_copy), "--data", str(train_data), "--out", str(tmp_path / "r")])
    one_line_error(res, "blocks.1", "extract")
    assert not (tmp_path / "r").exists()

    res = runner.invoke(app, extract_args(train_data, cache_copy))
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["info", str(cache_copy), "--verify", "-q"]).exit_code == 0
    assert digest(cache_copy) == before  # recomputed bit for bit, the sound chunks untouched


def test_extract_overwrite_keeps_the_old_cache_until_the_new_one_is_whole(cache_copy, train_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    before = digest(cache_copy)
    bad = sorted((data / "subj01").rglob("*.png"))[5]
    bad.write_bytes(b"")
    res = runner.invoke(app, [*extract_args(data, cache_copy), "--overwrite"])
    one_line_error(res, bad.name)
    assert digest(cache_copy) == before
    # fixed, the same --overwrite builds the new cache (resuming what it had) and swaps it in
    shutil.copyfile(sorted((train_data / "subj01").rglob("*.png"))[5], bad)
    res = runner.invoke(app, [*extract_args(data, cache_copy), "--overwrite", "--chunk-images", "8"])
    assert res.exit_code == 0, res.output
    assert FeatureCache.open(cache_copy).attrs["chunk_images"] == 8
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".cache")]


# --- run folders ------------------------------------------------------------------------------


def unfinish(run: Path) -> None:
    """Make a finished run look interrupted after its last checkpoint: no end in run.json, and the
    summary the best epoch writes, not the run's final one."""
    spec = json.loads((run / "run.json").read_text())
    del spec["finished"]
    (run / "run.json").write_text(json.dumps(spec))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({k: summary[k] for k in ("best_epoch", "val", "trial")}))


def fit_head(cache, data, out, *extra):
    return runner.invoke(app, ["fit-head", str(cache), "--data", str(data), "--out", str(out), *FAST, "-q", *extra])


def test_resume_names_a_changed_setting_and_another_cache(small_cache, train_data, tmp_path):
    run = tmp_path / "run"
    assert fit_head(small_cache, train_data, run, "--checkpoint-minutes", "1e-9").exit_code == 0
    unfinish(run)
    before = digest(run)
    one_line_error(fit_head(small_cache, train_data, run, "--resume", "--set", "lr=0.01"), "lr 0.003 vs 0.01")
    other = tmp_path / "other"  # the same images and layers through differently initialised weights
    res = runner.invoke(app, [*extract_args(train_data, other), "--seed", "1"])
    assert res.exit_code == 0, res.output
    one_line_error(fit_head(other, train_data, run, "--resume"), "other features", "weights_fingerprint")
    assert digest(run) == before


def test_a_finished_run_is_left_as_it_is(small_cache, train_data, tmp_path):
    run = tmp_path / "run"
    assert fit_head(small_cache, train_data, run).exit_code == 0
    before = digest(run)
    res = fit_head(small_cache, train_data, run, "--resume")
    assert res.exit_code == 0 and "finished earlier; left as it is" in " ".join(res.output.split())
    assert digest(run) == before
    one_line_error(fit_head(small_cache, train_data, run), "holds a finished run", "--overwrite")
    res = fit_head(small_cache, train_data, run, "--overwrite", "--set", "lr=0.01")
    assert res.exit_code == 0, res.output
    assert '"lr": 0.01' in (run / "run.json").read_text()


def test_a_run_stopped_before_its_first_checkpoint_is_no_dead_end(small_cache, train_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text("{}")  # what a run killed during its PCA leaves
    one_line_error(fit_head(small_cache, train_data, run), "unfinished run", "--resume", "--overwrite")
    res = fit_head(small_cache, train_data, run, "--resume")
    assert res.exit_code == 0, res.output
    assert "starting it over" in " ".join(res.output.split())
    assert (run / "best.safetensors").is_file()


def test_a_second_writer_is_refused(small_cache, train_data, tmp_path):
    run = tmp_path / "run"
    assert fit_head(small_cache, train_data, run, "--set", "epochs=1").exit_code == 0
    unfinish(run)
    before = digest(run)
    holder = RunFolder(run)
    holder.claim()
    try:
        one_line_error(fit_head(small_cache, train_data, run, "--set", "epochs=1", "--resume"), "another blobenc")
        one_line_error(fit_head(small_cache, train_data, run, "--set", "epochs=1", "--overwrite"), "another blobenc")
    finally:
        holder.release()
    assert digest(run) == before


def test_fit_ridge_overwrite_replaces_only_once_the_new_run_is_whole(small_cache, train_data, tmp_path):
    run = tmp_path / "ridge"
    args = ["fit-ridge", str(small_cache), "--data", str(train_data), "--out", str(run), "-q"]
    assert runner.invoke(app, args).exit_code == 0
    before = digest(run)
    one_line_error(runner.invoke(app, args), "holds a run", "--overwrite")
    one_line_error(runner.invoke(app, [*args, "--overwrite", "--layers", "nope*"]), "nope*")
    assert digest(run) == before
    assert runner.invoke(app, [*args, "--overwrite", "--layers", "blocks.1"]).exit_code == 0
    assert json.loads((run / "model.json").read_text())["layers"] == ["blocks.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ridge"]


# --- filesystem errors ------------------------------------------------------------------------


def test_out_naming_a_file_is_one_line(small_cache, train_data, tmp_path):
    file = tmp_path / "file"
    file.write_text("mine")
    one_line_error(fit_head(small_cache, train_data, file), str(file), "is a file")
    res = runner.invoke(app, ["fit-ridge", str(small_cache), "--data", str(train_data), "--out", str(file)])
    one_line_error(res, str(file), "is a file")
    assert file.read_text() == "mine"


def test_a_read_only_folder_is_one_line_naming_it(small_cache, train_data, tmp_path):
    with tmpfs(tmp_path / "ro", "1m") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        for args in (
            ["fit-head", str(small_cache), "--data", str(train_data), "--out", str(ro / "run"), *FAST],
            ["fit-ridge", str(small_cache), "--data", str(train_data), "--out", str(ro / "run")],
            extract_args(train_data, ro / "cache"),
            ["synth", str(ro / "data"), "--subjects", "1", "--train-images", "4", "--test-images", "2"],
        ):
            one_line_error(runner.invoke(app, args), str(ro), "Read-only file system")


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(small_cache, train_data, tmp_path):
    with tmpfs(tmp_path / "small", "300k") as small:
        (small / "keep.txt").write_text("kept")
        res = runner.invoke(app, ["fit-head", str(small_cache), "--data", str(train_data), "--out", str(small / "run"),
                                  *FAST])  # fmt: skip
        one_line_error(res, str(small), "No space left on device")
        res = runner.invoke(app, ["fit-ridge", str(small_cache), "--data", str(train_data), "--out",
                                  str(small / "ridge")])  # fmt: skip
        one_line_error(res, str(small), "No space left on device")
        assert not (small / "ridge").exists() and not (small / ".ridge.tmp").exists()
        assert (small / "keep.txt").read_text() == "kept"


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "layers=[blocks.7]"], "'blocks.7' is not a layer of the cache"),
        (["--set", "lr=nan"], "lr=nan: expected a finite number"),
        (["--set", "lr=inf"], "lr=inf: expected a finite number"),
        (["--checkpoint-minutes", "-5"], "--checkpoint-minutes -5.0: expected minutes >= 0"),
        (["--set", "hidden_dim=10000000"], "--max-memory"),
    ],
)
def test_bad_values_are_refused_before_any_work(extra, needle, small_cache, train_data, tmp_path):
    one_line_error(fit_head(small_cache, train_data, tmp_path / "run", *extra), needle)
    assert not (tmp_path / "run").exists()


def test_an_fmri_file_of_strings_is_named(small_cache, train_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(train_data, data)
    path = data / "subj02/training_split/training_fmri/lh_training_fmri.npy"
    np.save(path, np.load(path).astype(str))
    res = runner.invoke(app, ["fit-ridge", str(small_cache), "--data", str(data), "--out", str(tmp_path / "r")])
    one_line_error(res, str(path), "dtype <U")


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    from blobenc.data.generic import GenericDataset  # noqa: F401  (the layout under test)

    root = tmp_path / "g"
    res = runner.invoke(app, ["synth", str(root), "--layout", "generic", "--subjects", "1", "--train-images", "6",
                              "--test-images", "2", "--image-size", "16", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    for csv in root.rglob("*.csv"):
        csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())
    assert runner.invoke(app, ["info", str(root), "-q"]).exit_code == 0


# --- predictions know their dataset -----------------------------------------------------------


def test_predictions_for_another_dataset_are_refused(small_cache, train_data, tmp_path):
    ridge = tmp_path / "ridge"
    assert runner.invoke(app, ["fit-ridge", str(small_cache), "--data", str(train_data), "--out", str(ridge),
                               "-q"]).exit_code == 0  # fmt: skip
    pred = tmp_path / "pred"
    res = runner.invoke(app, ["predict", str(ridge), "--data", str(train_data), "--out", str(pred), "-q"])
    assert res.exit_code == 0, res.output
    other = tmp_path / "other"  # the same shapes, other images
    shutil.copytree(train_data, other)
    subj = other / "subj01/training_split/training_images"
    first = sorted(subj.iterdir())[0]
    first.rename(first.with_name(first.name.replace("nsd-", "nsd-9")))
    one_line_error(runner.invoke(app, ["evaluate", str(pred), "--data", str(other)]), "another dataset")
    assert runner.invoke(app, ["evaluate", str(pred), "--data", str(train_data)]).exit_code == 0
    (pred / ".predict-999999999-dead").mkdir()  # what a killed predict leaves
    res = runner.invoke(app, ["predict", str(ridge), "--data", str(train_data), "--out", str(pred), "-q"])
    assert res.exit_code == 0 and not list(pred.glob(".predict-*"))


# --- kill -9 at seeded random points, then the rerun the user is told to type ------------------


def _blobenc(*args: str) -> list[str]:
    return [sys.executable, "-m", "blobenc", *args]


def _killed_then_rerun(cmd: list[str], rerun: list[str], whole: list[str], seed: int) -> None:
    """Run `whole` uninterrupted; run `cmd` and SIGKILL it after a seeded random share of the time
    `whole` took, then run `rerun` to the end."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run(whole, env=env, check=True, capture_output=True)
    delay = np.random.default_rng(seed).uniform(0.3, 0.8) * (time.perf_counter() - t0)
    for _ in range(4):  # a loaded machine runs at another pace: a run that ended first is run again, killed sooner
        shutil.rmtree(Path(cmd[cmd.index("--out") + 1]), ignore_errors=True)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=delay)
            delay /= 2
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
    else:
        pytest.fail(f"{cmd[3]} ended each time before it was killed")
    res = subprocess.run(rerun, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


def _arrays(folder: Path, pattern: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for p in sorted(folder.rglob(pattern)):
        out |= {f"{p.relative_to(folder)}:{k}": v for k, v in (load_file(p) if p.suffix == ".safetensors" else
                                                                {"": np.load(p)}).items()}  # fmt: skip
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_random_points_then_rerun_equals_uninterrupted(seed, small_cache, train_data, tmp_path):
    data, cache = str(train_data), str(small_cache)
    often = ["--checkpoint-minutes", "0.001", "-q"]
    # command -> (its arguments before --out, after it, what the interrupted one is rerun with,
    # the files compared)
    commands = {
        "head": (["fit-head", cache, "--data", data], [*FAST, "--set", "epochs=4", *often], ["--resume"],
                 "best.safetensors"),
        "ft": (["finetune", str(tmp_path / "head-whole"), "--data", data],
               ["--set", "epochs=2", "--set", "batch_size=32", "--set", "num_workers=0", "--device", "cpu", *often],
               ["--resume"], "best.safetensors"),
        "ridge": (["fit-ridge", cache, "--data", data], ["-q"], [], "*.safetensors"),
        "pred": (["predict", str(tmp_path / "head-whole"), "--data", data], ["-q"], [], "*.npy"),
    }  # fmt: skip
    for name, (head, tail, rerun, files) in commands.items():
        killed, whole = tmp_path / name, tmp_path / f"{name}-whole"
        _killed_then_rerun(
            _blobenc(*head, "--out", str(killed), *tail),
            _blobenc(*head, "--out", str(killed), *tail, *rerun),
            _blobenc(*head, "--out", str(whole), *tail),
            seed,
        )
        _same(_arrays(killed, files), _arrays(whole, files))
    assert not list((tmp_path / "pred").glob(".predict-*"))
    killed, whole = tmp_path / "cache", tmp_path / "cache-whole"
    extract = [_blobenc(*extract_args(train_data, out)) for out in (killed, killed, whole)]
    _killed_then_rerun(*extract, seed)
    assert digest(killed) == digest(whole)
