"""blobenc: image-computable fMRI encoding models on cached timm features."""

from blobenc.data.algonauts import AlgonautsDataset, GroupSpace, ImageIndex, Subject, ValidationSplit
from blobenc.data.synth import SynthConfig, write_synthetic
from blobenc.errors import BlobencError, CacheError, ConfigError, DataError, ModelError, PredictionError
from blobenc.predictions import evaluate, submit

__version__ = "0.1.0"

__all__ = [
    "AlgonautsDataset",
    "BlobencError",
    "CacheError",
    "ConfigError",
    "DataError",
    "GroupSpace",
    "ImageIndex",
    "ModelError",
    "PredictionError",
    "Subject",
    "SynthConfig",
    "ValidationSplit",
    "evaluate",
    "submit",
    "write_synthetic",
]
