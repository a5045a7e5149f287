"""Shared pytest fixtures: a real S3-compatible server (SeaweedFS on loopback)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.s3server import SeaweedS3


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One SeaweedFS server (master, volume, filer, S3 gateway) for the whole session.

    Tests may ``kill()`` and ``start()`` it (same ports, same data); the
    ``s3`` fixture makes sure it is up again before the next test.
    """
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start_on_free_ports()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(seaweed: SeaweedS3) -> Iterator[tuple[str, dict[str, object]]]:
    """``(url, storage_options)`` of a fresh, empty bucket on the session's server."""
    if not seaweed.running:
        seaweed.start()
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    url = seaweed.make_bucket(bucket)
    yield url, seaweed.storage_options
    if not seaweed.running:  # a test that crashed the server must not break the next one
        seaweed.start()
