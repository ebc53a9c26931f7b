import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a download attempt would retry for ~47 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blobenc.data.synth import SynthConfig, write_synthetic


def pytest_runtest_logreport(report):
    """With BLOBENC_FAILURES=FILE, each failure's reason is appended as it happens (by the xdist
    controller or a plain run), so that a run cut off by a time limit (a lent GPU's) still says why."""
    path = os.environ.get("BLOBENC_FAILURES")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext[-3000:]}\n\n")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """8 subjects, small vertex space, tiny images: the dataset most tests share (read-only)."""
    return write_synthetic(
        tmp_path_factory.mktemp("small") / "data",
        SynthConfig(subjects=8, train_images=12, test_images=6, image_size=32, seed=1),
    )


@pytest.fixture(scope="session")
def full_data(tmp_path_factory) -> Path:
    """Real vertex counts (subjects 6 and 8 as subsets), very few images."""
    return write_synthetic(
        tmp_path_factory.mktemp("full") / "data",
        SynthConfig(subjects=8, train_images=6, test_images=3, vertices="full", image_size=32, seed=2),
    )


@pytest.fixture
def data_copy(small_data, tmp_path) -> Path:
    """A private copy of the small dataset for tests that break files."""
    dst = tmp_path / "data"
    shutil.copytree(small_data, dst)
    return dst


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """3 subjects x 60 training images: enough that validation scores mean something (read-only)."""
    return write_synthetic(
        tmp_path_factory.mktemp("train") / "data",
        SynthConfig(subjects=3, train_images=60, test_images=10, image_size=32, seed=3),
    )


@pytest.fixture(scope="session")
def small_cache(train_data, tmp_path_factory) -> Path:
    """A tiny random-init ViT's blocks 1 and 3 over train_data's images (read-only)."""
    from blobenc.data import open_dataset
    from blobenc.features.extract import ExtractConfig, extract
    from blobenc.features.trunk import TrunkSpec

    index = open_dataset(train_data).unique_images()
    out = tmp_path_factory.mktemp("cache") / "cache"
    cfg = ExtractConfig(
        trunk=TrunkSpec("test_vit", False), layers=("blocks.[13]",), num_workers=0, chunk_images=16, device="cpu"
    )
    extract(index.keys, list(index.paths), out, cfg, progress=False)
    return out


@pytest.fixture
def torchrun():
    """run(*ARGS, port=P): `blobenc ARGS` as 2 torchrun processes on the CPU (gloo), one thread
    each; the command must succeed. Returns the finished process (its output captured)."""

    def run(*args: str, port: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
        env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        res = subprocess.run([*cmd, "-m", "blobenc", *args], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    return run
