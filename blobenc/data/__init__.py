"""Datasets: the `Dataset` protocol (base), its Algonauts 2023 and generic layouts, synthetic data."""

from blobenc.data.base import Dataset, GroupSpace, ImageIndex, Subject, ValidationSplit, open_dataset

__all__ = ["Dataset", "GroupSpace", "ImageIndex", "Subject", "ValidationSplit", "open_dataset"]
