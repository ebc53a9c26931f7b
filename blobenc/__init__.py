"""blobenc: image-computable fMRI encoding models on cached timm features."""

from blobenc.data.algonauts import AlgonautsDataset
from blobenc.data.base import Dataset, GroupSpace, ImageIndex, Subject, ValidationSplit, open_dataset
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
from blobenc.predictions import evaluate, submit

__version__ = "0.1.0"

__all__ = [
    "AlgonautsDataset",
    "BlobencError",
    "CacheError",
    "ConfigError",
    "DataError",
    "Dataset",
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
    "evaluate",
    "open_dataset",
    "submit",
    "write_generic",
    "write_synthetic",
]
