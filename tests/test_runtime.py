"""CPU sizing (blobenc.runtime), the profiler (blobenc.profile) and the torch group PCA."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from sklearn.decomposition import PCA
from typer.testing import CliRunner

from blobenc import pca as pca_mod
from blobenc import profile, runtime
from blobenc.cli import app
from blobenc.errors import ConfigError
from blobenc.features.extract import ExtractConfig, extract
from blobenc.features.trunk import TrunkSpec
from blobenc.pca import GroupPCA

runner = CliRunner()


@pytest.fixture
def cores(monkeypatch):
    """Set the cores the process may use: sched_getaffinity patched, no cgroup quota, no env."""
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: None)
    for var in ("BLOBENC_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()

    def set_cores(n: int) -> None:
        monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(n)))

    yield set_cores
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("n", "threads", "cpu_workers", "gpu_workers"),
    [(1, 1, 0, 0), (2, 2, 0, 1), (4, 4, 1, 3), (16, 16, 4, 8), (64, 64, 8, 8)],
)
def test_thread_and_worker_defaults_follow_the_available_cores(cores, n, threads, cpu_workers, gpu_workers):
    cores(n)
    assert runtime.available_cores() == n
    assert runtime.default_threads() == threads
    assert runtime.default_workers("cpu") == cpu_workers
    assert runtime.default_workers("cuda") == gpu_workers
    assert runtime.configure_cpu()["threads"] == threads and torch.get_num_threads() == threads


def test_cgroup_quota_and_environment_cap_the_threads(cores, monkeypatch):
    cores(16)
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 3)  # docker --cpus 2.5
    assert runtime.available_cores() == 3 and runtime.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert runtime.default_threads() == 2
    monkeypatch.setenv("BLOBENC_THREADS", "1")
    assert runtime.configure_cpu()["threads"] == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("BLOBENC_THREADS", "many")
    with pytest.raises(ConfigError, match="BLOBENC_THREADS='many'"):
        runtime.default_threads()


def test_allocator_left_alone_when_the_user_chose(monkeypatch):
    monkeypatch.setattr(runtime, "_state", {})
    monkeypatch.setenv("BLOBENC_MALLOC", "default")
    assert runtime._keep_freed_memory().startswith("default")
    monkeypatch.delenv("BLOBENC_MALLOC")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # not one blobenc sets: still tuned
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert runtime._keep_freed_memory().startswith("user settings")


def anonymous_memory_after(body: str) -> list[int]:
    """Run `body` in a fresh interpreter after configure_cpu, with anon() (RssAnon in bytes) and
    `before` (its value at the start) defined; `body` prints numbers on one line, returned. Skips
    where the allocator is not tuned (not glibc, or the user's own settings)."""
    script = f"""
import numpy as np
from blobenc.runtime import configure_cpu, large_blocks_mapped, release_memory

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

print(configure_cpu()["malloc"])
before = anon()
{body}
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "BLOBENC_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    policy, sizes = out.stdout.splitlines()
    if not policy.startswith("keep freed memory"):
        pytest.skip(f"allocator not tuned here: {policy}")
    return [int(x) for x in sizes.split()]


def test_release_memory_gives_a_phase_s_freed_blocks_back_to_the_kernel():
    """configure_cpu keeps freed memory in the heap (fast training steps); release_memory must
    still give a phase's big temporaries back: at the full NSD size, fit-head held 23 GB after its
    group PCA where 8 GB were live (#21)."""
    held, kept, released = anonymous_memory_after("""
blocks = [np.ones(8 << 20) for _ in range(8)]  # 8 x 64 MB, touched
small = np.ones(1 << 10)  # allocated after them: the freed blocks are not the heap's top
held = anon() - before
del blocks
kept = anon() - before
release_memory()
print(held, kept, anon() - before)
""")
    assert held > 500e6 and kept > 500e6  # freed but kept for reuse
    assert released < 50e6, (held, kept, released)


def test_large_blocks_mapped_returns_each_freed_block_at_once_and_the_heap_keeps_small_ones():
    """Inside a one-off phase (fit-head's group PCA) a freed large block goes back to the kernel
    at once, leaving no hole in the heap; outside, blocks are kept for reuse as before."""
    held, inside, outside = anonymous_memory_after("""
with large_blocks_mapped():
    blocks = [np.ones(8 << 20) for _ in range(8)]  # 8 x 64 MB, touched
    small = np.ones(1 << 10)
    held = anon() - before
    del blocks
    inside = anon() - before
blocks = [np.ones(8 << 20) for _ in range(8)]
small2 = np.ones(1 << 10)  # allocated after them: the freed blocks are not the heap's top
del blocks
print(held, inside, anon() - before)
""")
    assert held > 500e6 and inside < 50e6, (held, inside)
    assert outside > 500e6  # the heap keeps freed memory again after the phase


def test_extract_workers_default_to_the_cores(cores, monkeypatch, tmp_path):
    """extract asks default_workers for its device: no worker processes on a 2-core CPU."""
    from blobenc.features import extract as extract_mod

    seen = {}

    class Loader:
        def __init__(self, dataset, num_workers, **kw):
            seen["workers"] = num_workers
            raise RuntimeError("stop")

    cores(2)
    monkeypatch.setattr(extract_mod, "DataLoader", Loader)
    images = tmp_path / "img"
    images.mkdir()
    with pytest.raises(RuntimeError, match="stop"):
        extract(
            ["a"],
            [images / "a.png"],
            tmp_path / "c",
            ExtractConfig(TrunkSpec("test_vit", False), ("blocks.1",), device="cpu"),
        )
    assert seen["workers"] == 0


def test_phases_nest_and_count_and_cost_nothing_when_off():
    assert profile.phase("x") is profile.phase("y")  # the shared no-op: no profiler active

    @profile.timed("step")
    def step():
        with profile.phase("inner"):
            sum(range(1000))

    step()  # nothing recorded, nothing raised
    with profile.profiling() as prof:
        for _ in range(3):
            step()
        list(profile.timed_iter("read", iter(range(4))))
    assert prof.phases["step"].calls == 3 and prof.phases["step/inner"].calls == 3
    assert prof.phases["read"].calls == 5  # four items and the StopIteration
    data = prof.to_dict()
    total = data["total"]
    assert total["wall_s"] >= data["phases"]["step"]["wall_s"] >= 0
    assert {"user_s", "sys_s", "minor_faults", "major_faults", "voluntary_switches", "involuntary_switches"} <= set(
        total
    )
    assert data["runtime"]["torch_threads"] == torch.get_num_threads()
    with profile.profiling(enabled=False) as off:
        assert off is None and profile.active() is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from blobenc.data import open_dataset
    from blobenc.data.synth import SynthConfig, write_synthetic

    data = write_synthetic(
        tmp_path_factory.mktemp("prof") / "data",
        SynthConfig(subjects=2, train_images=30, test_images=6, image_size=32, seed=5),
    )
    index = open_dataset(data).unique_images()
    cache = tmp_path_factory.mktemp("pcache") / "cache"
    cfg = ExtractConfig(trunk=TrunkSpec("test_vit", False), layers=("blocks.1",), num_workers=0, chunk_images=16)
    extract(index.keys, list(index.paths), cache, cfg, progress=False)
    return data, cache


def test_profile_flag_and_environment_write_profile_json(tiny, tmp_path, monkeypatch):
    data, cache = tiny
    run = tmp_path / "ridge"
    res = runner.invoke(app, ["fit-ridge", str(cache), "--data", str(data), "--out", str(run), "--profile"])
    assert res.exit_code == 0, res.output
    prof = json.loads((run / "profile.json").read_text())
    assert {"solve", "read features", "scores", "write"} <= set(prof["phases"])
    assert prof["total"]["user_s"] > 0 and prof["runtime"]["cores_available"] >= 1
    assert "sys/user" in res.output

    monkeypatch.setenv("BLOBENC_PROFILE", "1")
    pred = tmp_path / "pred"
    res = runner.invoke(app, ["predict", str(run), "--data", str(data), "--out", str(pred), "--quiet"])
    assert res.exit_code == 0, res.output
    assert {"features", "predict", "write", "score"} <= set(json.loads((pred / "profile.json").read_text())["phases"])
    monkeypatch.setenv("BLOBENC_PROFILE", "0")
    res = runner.invoke(app, ["predict", str(run), "--data", str(data), "--out", str(tmp_path / "p2"), "--quiet"])
    assert res.exit_code == 0 and not (tmp_path / "p2" / "profile.json").exists()


def _low_rank(n: int, v: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = 10 / np.arange(1, rank + 1)  # a clear gap after `rank`
    signal = (rng.normal(size=(n, rank)) * scale) @ rng.normal(size=(rank, v))
    return (signal + 0.1 * rng.normal(size=(n, v)) + 3).astype(np.float32)


@pytest.mark.parametrize(("shape", "route"), [((400, 90), "gram"), ((90, 400), "gram"), ((400, 90), "randomized")])
def test_torch_pca_matches_sklearn(shape, route):
    """Both torch routes (the Gram one on either side) against scikit-learn's exact PCA:
    explained variance, the subspace (principal angles), the mean and the reconstruction."""
    Y = _low_rank(*shape, 6)
    ours = GroupPCA(6, backend=route).fit(Y)
    assert ours.solver_ == f"torch-{route}"
    ref = PCA(6, svd_solver="full").fit(Y)
    np.testing.assert_allclose(ours.explained_variance_, ref.explained_variance_, rtol=1e-3)
    np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_, rtol=1e-3)
    assert np.degrees(subspace_angles(ours.components_.T, ref.components_.T)).max() < 0.1
    np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(ours.components_ * ref.components_, 1)), 1, atol=1e-3)
    back = ours.inverse_transform(ours.transform(Y))
    np.testing.assert_allclose(back, ref.inverse_transform(ref.transform(Y)), atol=2e-3)
    # the sign convention is scikit-learn's: each component's largest |loading| positive
    assert (ours.components_[np.arange(6), np.abs(ours.components_).argmax(1)] > 0).all()
    assert ours.components_.dtype == np.float32 and ours.components_.flags.c_contiguous


@pytest.mark.parametrize("shape", [(300, 50), (60, 200)])  # covariance route; sample Gram with its own EM
def test_torch_pca_with_missing_vertices_agrees_with_sklearn_backend(shape):
    """EM imputation gives the same fit with either backend: subspace, variances, mean, and the
    imputed entries of Y (in place)."""
    n, v = shape
    Y = _low_rank(n, v, 4, seed=1)
    mask = np.ones_like(Y, dtype=bool)
    mask[: n // 3, v - v // 5 :] = False
    observed = np.where(mask, Y, 0)
    work = {b: observed.copy() for b in ("torch", "sklearn")}
    fits = {b: GroupPCA(4, backend=b, n_iter=5).fit(work[b], mask, copy=False) for b in work}
    t, s = fits["torch"], fits["sklearn"]
    assert t.solver_ == "torch-gram"
    np.testing.assert_allclose(t.explained_variance_, s.explained_variance_, rtol=1e-3)
    assert np.degrees(subspace_angles(t.components_.T, s.components_.T)).max() < 0.1
    np.testing.assert_allclose(t.mean_, s.mean_, atol=1e-3)
    np.testing.assert_allclose(work["torch"], work["sklearn"], atol=1e-3)
    assert (work["torch"][mask] == observed[mask]).all()
    # the gaps follow the low-rank structure: far closer to the truth than the vertex means
    mean_error = np.abs(Y[~mask] - np.broadcast_to(Y[mask.all(1)].mean(0), Y.shape)[~mask]).mean()
    assert np.abs(work["torch"][~mask] - Y[~mask]).mean() < 0.25 * mean_error


def test_pca_default_backend_is_torch_and_picks_the_route_by_cost(monkeypatch):
    Y = _low_rank(60, 30, 3)
    assert GroupPCA(3).fit(Y).solver_ == "torch-gram"
    monkeypatch.setattr(pca_mod, "GRAM_MAX_WIDTH_RATIO", 1)  # 30 > 1 x (3 + 10): randomized is cheaper
    assert GroupPCA(3).fit(Y).solver_ == "torch-randomized"
    assert GroupPCA(3, backend="sklearn").fit(Y).solver_.startswith("sklearn")
    with pytest.raises(ConfigError, match="expected one of auto, torch, gram, randomized, sklearn"):
        GroupPCA(3, backend="svd")


@pytest.mark.slow
def test_cpu_settings_leave_a_fixed_seed_run_unchanged(tiny, tmp_path):
    """The allocator and the OpenMP wait policy change how the CPU is fed, not the numbers: a
    fixed-seed fit-head with them undone (glibc's defaults, spinning OpenMP threads) scores as the
    CLI's defaults do. The thread count is the same on both sides: a different count sums in
    another order, which 300 optimizer steps on this tiny set grow to ~1e-3 in median R²."""
    import os
    import subprocess
    import sys

    data, cache = tiny
    scores = {}
    settings = {
        "cli defaults": {"BLOBENC_THREADS": "2"},
        "undone": {"BLOBENC_MALLOC": "default", "OMP_WAIT_POLICY": "ACTIVE", "BLOBENC_THREADS": "2"},
    }
    for name, extra in settings.items():
        run = tmp_path / name.replace(" ", "-")
        env = {k: v for k, v in os.environ.items() if k not in ("BLOBENC_THREADS", "OMP_WAIT_POLICY")}
        cmd = [sys.executable, "-m", "blobenc", "fit-head", str(cache), "--data", str(data), "--out", str(run)]
        subprocess.run([*cmd, "--device", "cpu", "--quiet"], env={**env, "HF_HUB_OFFLINE": "1", **extra}, check=True)
        scores[name] = json.loads((run / "summary.json").read_text())["val"]
    a, b = scores["cli defaults"], scores["undone"]
    assert a["median_r2"] == pytest.approx(b["median_r2"], abs=1e-6)
    for subj, s in a["subjects"].items():
        assert s["mean_r"] == pytest.approx(b["subjects"][subj]["mean_r"], abs=1e-6)


def test_available_memory_is_shared_among_the_local_torchrun_processes(monkeypatch):
    from blobenc.plan import available_memory

    alone = available_memory()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # what torchrun sets for 4 processes on this machine
    assert available_memory() == pytest.approx(alone / 4, rel=0.05)
