"""Shared pytest fixtures: a real S3-compatible server (SeaweedFS on loopback) and the
loopback Ray head the job tests share."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.s3server import SeaweedS3

# Ray Train's controller polls its workers every 2 s by default, and a run's end (or a
# worker's death) is noticed only at the next poll: tests of tiny runs spent a tenth of
# their time waiting on it (test_two_workers_train_resume_eval_sample: 54 -> 45 s).
# Set before any Ray instance starts, so every controller (in-process or a head started
# by a test) inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


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


# ---------------------------------------------------------------- one Ray head for the job tests

SHARED_RAY_HEAD = "shared_ray_head"
# Its checks of the cluster's ports and token run before any job has: it goes first.
FIRST_ON_THE_SHARED_HEAD = "test_submit.py"


class _SharedRayHead:
    """The loopback Ray head (``tests.test_submit.RayHead``) of the tests that submit jobs.

    Starting and stopping a head costs 10-25 s, so these tests share one: it starts
    with the first test that asks for it and stops after the last one, so no other
    test runs beside it (the modules that use it are run one after another).
    """

    def __init__(self) -> None:
        self.head = None
        self.last_user: pytest.Item | None = None

    def get(self):  # noqa: ANN201 - RayHead, imported late (psutil, the CLI)
        if self.head is None:
            from tests.test_submit import RayHead, python_first_path

            head = RayHead()
            # test_ray_jobs' entrypoint is `python -m sparse_transformer ...`, as a user
            # with the venv activated would write it: `python` is this interpreter
            head.env["PATH"] = python_first_path(head.temp_dir / "bin")
            head.start()
            self.head = head
        return self.head

    def stop(self) -> None:
        if self.head is not None:
            head, self.head = self.head, None
            head.stop()


_shared_ray_head = _SharedRayHead()


@pytest.fixture
def shared_ray_head():  # noqa: ANN201
    """The session's loopback Ray head with token authentication (started on first use)."""
    return _shared_ray_head.get()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules whose tests use the shared Ray head one after another (at the place
    of the first), ``FIRST_ON_THE_SHARED_HEAD`` first; every other module keeps its place."""
    modules: dict[object, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.path, []).append(item)
    users = [p for p, its in modules.items() if any(SHARED_RAY_HEAD in i.fixturenames for i in its)]
    if not users:
        return
    group = sorted(users, key=lambda p: p.name != FIRST_ON_THE_SHARED_HEAD)  # stable
    order: list[object] = []
    for path in modules:
        if path == users[0]:
            order += group
        elif path not in users:
            order.append(path)
    items[:] = [item for path in order for item in modules[path]]


def pytest_collection_finish(session: pytest.Session) -> None:
    users = [i for i in session.items if SHARED_RAY_HEAD in i.fixturenames]
    _shared_ray_head.last_user = users[-1] if users else None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    try:
        return (yield)
    finally:
        if item is _shared_ray_head.last_user or nextitem is None:
            _shared_ray_head.stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    _shared_ray_head.stop()
