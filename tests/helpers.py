"""Settings and checks the fit-head, trainer and reference tests share."""

import torch
from safetensors.torch import load_file

from blobenc.train.config import HeadConfig

# the tiny head settings the CLI tests train with
TINY_ARGS = [
    "--set",
    "batch_size=16",
    "--set",
    "hidden_dim=32",
    "--set",
    "dropout=0.2",
    "--set",
    "lr=3e-3",
    "--pca-components",
    "40",
]


TINY = {"epochs": 3, "batch_size": 32, "hidden_dim": 32, "proj_dim": 48, "lr": 3e-3, "dropout": 0.2}


def cfg(**kw):
    return HeadConfig(**(TINY | kw))


def assert_same_weights(a_path, b_path):
    a, b = load_file(a_path), load_file(b_path)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def load_file_meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())
