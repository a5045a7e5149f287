"""Exceptions raised by the data package.

Every error names the file, shard or URL it is about, so that a failing
preparation or training run says *what* is broken, not only that something is.
"""

from __future__ import annotations


class DataError(Exception):
    """Base class of every error raised by ``sparse_transformer.data``."""


class MalformedSourceError(DataError):
    """A raw input file (tarball, IDX file, audio file, ...) is unreadable or malformed."""


class DownloadError(DataError):
    """A download failed for good (HTTP 4xx, an unreadable archive, pip download failing)."""


class ChecksumMismatchError(DataError):
    """A file or shard does not have the checksum its manifest or registry records."""


class MissingShardError(DataError, FileNotFoundError):
    """A shard the manifest lists is not in storage (deleted, moved, or never copied)."""


class CorruptShardError(DataError):
    """A shard could be read but is not a valid shard of its manifest (bad Parquet, wrong shape)."""


class ManifestError(DataError):
    """A manifest is missing, unreadable or inconsistent."""


class RetriesExhaustedError(DataError):
    """A transient failure outlasted the storage client's retries (``RetryPolicy.max_attempts``)."""
