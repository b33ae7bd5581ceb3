"""Errors Thresher raises for bad input. Each names the file, row or field at fault."""

from __future__ import annotations


class ThresherError(Exception):
    """Base class: a problem the user can fix (bad config, bad data, bad path)."""


class ConfigError(ThresherError):
    """A job configuration is invalid; the message names the offending key path."""


class CorpusError(ThresherError):
    """A shard or record cannot be read; the message names the shard and row."""


class ManifestError(ThresherError):
    """A manifest is missing, uncommitted, partial, or would be overwritten."""


class ModelLoadError(ThresherError):
    """A model or tokenizer path cannot be loaded or the models are incompatible."""


class StageError(ThresherError):
    """A pipeline stage received input it cannot process (empty sets, NaNs, ...)."""


class StorageError(ThresherError):
    """Object storage cannot be reached, denies access, or lacks the bucket; the message names the URI."""

    kind: str = "storage"
