"""Object storage access through fsspec: ``file://``, ``s3://``, ``gs://``, ``memory://``, ...

One place decides how a URL becomes a filesystem: S3-compatible endpoints come
from ``storage_options`` (``endpoint_url``, ``key``, ``secret``) or from the
environment (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``); credentials are never logged. S3 clients get their
timeouts here and their retries from a :class:`~sparse_transformer.data.retry.RetryPolicy`
(botocore does the retrying; see :mod:`retry`). Writes of whole objects are atomic:
local files are written under a temporary name and renamed, object stores publish a
PUT only when it completes.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import split_protocol

from sparse_transformer.data.retry import FAIL_FAST, RetryPolicy, log_s3_retries

S3_PROTOCOLS = ("s3", "s3a")
# Per attempt; the attempts come from the RetryPolicy.
_S3_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 60}


def normalize_url(url: str) -> str:
    """A URL with an explicit protocol; bare paths become ``file://`` absolute paths."""
    protocol, _ = split_protocol(url)
    if protocol is None:
        return "file://" + os.path.abspath(url)
    return url


def storage_options_for(
    url: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None
) -> dict[str, Any]:
    """The fsspec options for ``url``: the caller's, plus S3 endpoint defaults from the env
    and the S3 client's timeouts and retries (``retry``; None: ``retry.FAIL_FAST``, 3
    attempts); the caller's own ``config_kwargs`` win."""
    options = dict(storage_options or {})
    protocol, _ = split_protocol(url)
    if protocol in S3_PROTOCOLS:
        client_kwargs = dict(options.pop("client_kwargs", None) or {})
        endpoint = options.pop("endpoint_url", None) or client_kwargs.get("endpoint_url")
        endpoint = (
            endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        config: dict[str, Any] = {**_S3_TIMEOUTS, "retries": (retry or FAIL_FAST).s3_config()}
        config.update(options.get("config_kwargs") or {})
        options["config_kwargs"] = config
    return options


def filesystem(
    url: str, storage_options: dict[str, Any] | None = None, retry: RetryPolicy | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for ``url``; the path is what the filesystem's methods take.

    An S3 filesystem tries each request as often as ``retry`` says (None: 3 attempts,
    ``retry.FAIL_FAST``) and logs every retry it makes.
    """
    url = normalize_url(url)
    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, storage_options, retry))
    if split_protocol(url)[0] in S3_PROTOCOLS:
        log_s3_retries(fs)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join path components onto a URL or filesystem path with ``/``."""
    return posixpath.join(base.rstrip("/"), *parts) if base else posixpath.join(*parts)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem (where a rename is atomic and cheap)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """A fresh temporary file beside local ``path``: write it inside the block; when the
    block ends without an exception it is (fsync'ed and) renamed onto ``path`` in one
    step, so readers see the old file or the whole new one; otherwise it is removed.
    The project's one write-to-temp-then-rename."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it.

    Local files go through :func:`replacing`; object stores (S3, GCS, memory) publish an
    object only when its upload completes, so they are written directly.
    """
    if is_local(fs):
        with replacing(path) as tmp:
            tmp.write_bytes(data)
    else:
        fs.pipe_file(path, data)


def remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete ``path`` if it exists; a cleanup step must not mask the error being handled."""
    try:
        if fs.exists(path):
            fs.rm_file(path)
    except Exception:  # noqa: BLE001 - best effort during cleanup
        pass
