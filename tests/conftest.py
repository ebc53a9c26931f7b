import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a download attempt would retry for ~47 s
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil
from pathlib import Path

import pytest

from blobenc.data.synth import SynthConfig, write_synthetic


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
