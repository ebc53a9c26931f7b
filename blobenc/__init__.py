"""blobenc: image-computable fMRI encoding models on cached timm features.

The Python API is the CLI's commands as functions (blobenc.api): `extract`, `fit_ridge`,
`compare`, `fit_head`, `finetune`, `predict`, `evaluate`, `submit`, `report`, `plot_map`, and
`load_run(path)`, which gives any run's fitted model as an `Encoder`. torch is imported when they first run.
"""

from blobenc.api import compare, evaluate, extract, finetune, fit_head, fit_ridge, plot_map, predict, report, submit
from blobenc.data import open_dataset
from blobenc.data.algonauts import AlgonautsDataset
from blobenc.data.base import Dataset, GroupSpace, ImageIndex, Subject, ValidationSplit
from blobenc.data.generic import GenericDataset, write_generic
from blobenc.data.synth import SynthConfig, write_synthetic
from blobenc.errors import (
    BlobencError,
    CacheError,
    ConfigError,
    DataError,
    ModelError,
    PredictionError,
    ReportError,
    ResourceError,
    TrainingError,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    """`load_run` and `Encoder` on first use: they import torch."""
    if name in ("load_run", "Encoder"):
        from blobenc import run

        return getattr(run, name)
    raise AttributeError(f"module 'blobenc' has no attribute {name!r}")


__all__ = [
    "AlgonautsDataset",
    "BlobencError",
    "CacheError",
    "ConfigError",
    "DataError",
    "Dataset",
    "Encoder",
    "GenericDataset",
    "GroupSpace",
    "ImageIndex",
    "ModelError",
    "PredictionError",
    "ReportError",
    "ResourceError",
    "Subject",
    "SynthConfig",
    "TrainingError",
    "ValidationSplit",
    "compare",
    "evaluate",
    "extract",
    "finetune",
    "fit_head",
    "fit_ridge",
    "load_run",
    "open_dataset",
    "plot_map",
    "predict",
    "report",
    "submit",
    "write_generic",
    "write_synthetic",
]
