"""Typed errors. Library code raises these; only the CLI prints them."""


class BlobencError(Exception):
    """Base class: the message is one line that names the file, value or option at fault."""


class DataError(BlobencError):
    """A dataset file is missing or does not hold what the layout requires."""


class PredictionError(BlobencError):
    """A prediction file is missing or has the wrong shape, dtype or values."""


class CacheError(BlobencError):
    """A feature cache is missing, incomplete or was made with other settings."""


class ModelError(BlobencError):
    """A trunk cannot be built or its layers cannot be resolved."""


class ConfigError(BlobencError):
    """An option or config value is invalid."""


class ResourceError(BlobencError):
    """A command's plan needs more memory than it may use."""


class TrainingError(BlobencError):
    """Training cannot go on (a non-finite loss in every trial)."""


class ReportError(BlobencError):
    """A folder is not a run, runs cannot be compared, or the report extra is not installed."""
