"""The local Ray instance listens on loopback only, and its auth token is private.

A real local cluster (dashboard on when its packages are installed, a task and an
actor running so that workers exist): every listening socket of the driver and of
every process it started is on a loopback address. ``HOME`` points at a temporary
folder, so Ray's token file is created there.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sparse_transformer.distributed.loopback import private_auth_token


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every TCP socket the processes listen on."""
    out = []
    for p in processes:
        try:
            conns = p.net_connections(kind="tcp")
            name = " ".join(p.cmdline()[:2])[:80] or p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out += [(name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def ray_processes() -> list[psutil.Process]:
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


@pytest.fixture
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from tests.test_submit import reset_ray_token_cache

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    reset_ray_token_cache()  # Ray caches the token process-wide: read this HOME's
    try:
        yield tmp_path
    finally:
        reset_ray_token_cache()  # and let later tests read their own


@pytest.fixture
def started(own_home: Path) -> Iterator[None]:
    import ray

    from sparse_transformer.distributed.config import load_config
    from sparse_transformer.distributed.trainer import init_ray

    assert not ray.is_initialized()
    instance = init_ray(load_config("tiny", ["run.num_cpus=1"]))
    try:
        assert instance.started
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_the_local_cluster_listens_on_loopback_only(started: None) -> None:
    import ray

    from sparse_transformer.distributed.loopback import node_ip

    @ray.remote(num_cpus=0)
    class Echo:
        def ping(self) -> str:
            return "pong"

    actor = Echo.remote()
    assert ray.get([ray.remote(lambda: 1).remote(), actor.ping.remote()]) == [1, "pong"]
    assert node_ip() == "127.0.0.1"
    sockets = listening(ray_processes())
    assert len(sockets) >= 5, sockets  # GCS, raylet, workers, agents: they were found
    outside = [s for s in sockets if not is_loopback(s[1])]
    assert not outside, "listening beyond loopback: " + "; ".join(map(str, outside))


@pytest.mark.slow
def test_the_auth_token_ray_creates_is_private(started: None, own_home: Path) -> None:
    token = own_home / ".ray" / "auth_token"
    assert token.is_file() and token.read_text().strip()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700


def test_an_existing_token_file_is_narrowed_and_kept(own_home: Path) -> None:
    (own_home / ".ray").mkdir()
    token = own_home / ".ray" / "auth_token"
    token.write_text("abc123")
    token.chmod(0o644)
    assert private_auth_token() == token
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.read_text() == "abc123"


def test_a_token_the_user_manages_is_left_alone(
    own_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(own_home / "mine"))
    assert private_auth_token() is None
    assert not (own_home / ".ray").exists() and not (own_home / "mine").exists()
    assert os.environ["HOME"] == str(own_home)
