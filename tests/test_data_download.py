"""Downloads over real HTTP (a server on 127.0.0.1): checksums, retries of 5xx and cut
connections up to the policy's attempts, permanent 404s; a source's downloader end to end; and
the wiki sample from PyPI (skipped when PyPI cannot be reached)."""

from __future__ import annotations

import bz2
import hashlib
import http.server
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sparse_transformer.data import (
    ChecksumMismatchError,
    DownloadError,
    RetriesExhaustedError,
    RetryPolicy,
    prepare,
)
from sparse_transformer.data import download as dl
from tests.test_data_formats import cifar_to_hwc, make_cifar_tarball, read_split

FIVE_ATTEMPTS = RetryPolicy(max_attempts=5)


class Routes:
    """What the test server answers: path -> list of responses, the last one repeating."""

    def __init__(self) -> None:
        self.responses: dict[str, list[tuple[int, bytes, int | None]]] = {}
        self.hits: dict[str, int] = {}


@pytest.fixture
def http_server() -> Iterator[tuple[str, Routes]]:
    routes = Routes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            n = routes.hits.get(self.path, 0)
            routes.hits[self.path] = n + 1
            script = routes.responses.get(self.path, [(404, b"not found", None)])
            status, body, declared = script[min(n, len(script) - 1)]
            self.send_response(status)
            self.send_header("Content-Length", str(declared if declared is not None else len(body)))
            self.end_headers()
            self.wfile.write(body)  # a declared length > len(body) is a cut connection

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_download_verifies_and_reuses_the_cached_copy(
    http_server: tuple[str, Routes], tmp_path: Path
) -> None:
    base, routes = http_server
    body = bytes(range(256)) * 1000
    routes.responses["/f.bin"] = [(200, body, None)]
    md5 = hashlib.md5(body).hexdigest()
    dest = tmp_path / "cache" / "f.bin"
    assert dl.download(f"{base}/f.bin", dest, md5=md5, policy=FIVE_ATTEMPTS).read_bytes() == body
    dl.download(f"{base}/f.bin", dest, md5=md5, policy=FIVE_ATTEMPTS)
    assert routes.hits["/f.bin"] == 1  # served from the cache the second time
    dest.write_bytes(b"stale")  # a cached copy that no longer verifies is fetched again
    dl.download(f"{base}/f.bin", dest, md5=md5, policy=FIVE_ATTEMPTS)
    assert routes.hits["/f.bin"] == 2 and dest.read_bytes() == body


def test_5xx_and_cut_connections_are_retried(
    http_server: tuple[str, Routes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, routes = http_server
    body = b"x" * 10_000
    routes.responses["/flaky"] = [
        (503, b"busy", None),
        (200, body[:5000], len(body)),  # the connection closes half-way
        (200, body, None),
    ]
    with caplog.at_level(logging.WARNING, logger="sparse_transformer.data"):
        dl.download(
            f"{base}/flaky",
            tmp_path / "f",
            sha256=hashlib.sha256(body).hexdigest(),
            policy=FIVE_ATTEMPTS,
        )
    assert routes.hits["/flaky"] == 3 and (tmp_path / "f").read_bytes() == body
    assert caplog.text.count("transient failure") == 2 and "HTTP Error 503" in caplog.text


def test_5xx_that_persists_gives_up_after_the_policy_s_attempts(
    http_server: tuple[str, Routes], tmp_path: Path
) -> None:
    base, routes = http_server
    routes.responses["/down"] = [(503, b"busy", None)]
    with pytest.raises(
        RetriesExhaustedError, match=r"download .*/down: giving up after 3 attempts"
    ):
        dl.download(f"{base}/down", tmp_path / "d", policy=RetryPolicy(max_attempts=3))
    assert routes.hits["/down"] == 3 and list(tmp_path.iterdir()) == []
    routes.responses["/cut"] = [(200, b"x" * 10, 100)]  # every response cut short
    with pytest.raises(RetriesExhaustedError, match=r"/cut: giving up .* IncompleteRead"):
        dl.download(f"{base}/cut", tmp_path / "c", policy=RetryPolicy(max_attempts=2))
    assert routes.hits["/cut"] == 2 and list(tmp_path.iterdir()) == []


def test_404_is_permanent_and_a_bad_checksum_leaves_nothing(
    http_server: tuple[str, Routes], tmp_path: Path
) -> None:
    base, routes = http_server
    with pytest.raises(DownloadError, match=r"/missing: HTTP 404"):
        dl.download(f"{base}/missing", tmp_path / "m", policy=FIVE_ATTEMPTS)
    assert routes.hits["/missing"] == 1
    routes.responses["/wrong"] = [(200, b"tampered", None)]
    with pytest.raises(ChecksumMismatchError, match=r"download .*/wrong: .*md5 .* does not match"):
        dl.download(f"{base}/wrong", tmp_path / "w", md5="0" * 32, policy=FIVE_ATTEMPTS)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a partial one


def test_cifar10_downloader_end_to_end(
    http_server: tuple[str, Routes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparse_transformer.data.sources import images

    base, routes = http_server
    tarball = tmp_path / "src.tar.gz"
    batches = make_cifar_tarball(tarball, per_batch=10)
    blob = tarball.read_bytes()
    routes.responses["/cifar-10-python.tar.gz"] = [(200, blob, None)]
    monkeypatch.setattr(images, "CIFAR10_URL", f"{base}/cifar-10-python.tar.gz")
    monkeypatch.setattr(images, "CIFAR10_MD5", hashlib.md5(blob).hexdigest())
    out = f"file://{tmp_path}/ds"
    m = prepare("cifar10", out, cache_dir=str(tmp_path / "cache"), validation_size=4)
    assert m.source["url"].endswith("/cifar-10-python.tar.gz")
    assert (tmp_path / "cache" / "downloads" / "cifar-10-python.tar.gz").exists()
    np.testing.assert_array_equal(read_split(out, "test"), cifar_to_hwc(batches["test_batch"]))
    with pytest.raises(FileNotFoundError, match="downloads are disabled"):
        prepare("cifar10", out, download=False)


def test_wiki_sample_from_the_gensim_wheel(tmp_path: Path) -> None:
    # pip's own index configuration decides where the wheel comes from (no probe of ours)
    try:
        xml = dl.fetch_wiki_sample()  # into ~/.cache/sparse-transformer, shared with make train
    except dl.DownloadError as e:
        pytest.skip(f"no package index serves the gensim wheel here: {e}")
    data = xml.read_bytes()
    assert len(data) == 6_089_746 and hashlib.sha256(data).hexdigest() == dl.WIKI_SAMPLE_SHA256
    m = prepare("wiki-sample", "memory://wiki-test", seq_len=4096)
    split = m.splits
    total = sum(s.num_tokens + s.dropped_tokens for s in split.values())
    assert total == 6_089_746
    assert m.source["origin"].startswith("pip download gensim==4.4.0")
    first = read_split("memory://wiki-test", "train")[0].tobytes()
    assert first.startswith(b"<mediawiki") and first == data[:4096]
    # A local copy (here a re-compressed .bz2) is verified by its decompressed sha256.
    local = tmp_path / "sample.xml.bz2"
    local.write_bytes(bz2.compress(data))
    m2 = prepare(
        "wiki-sample",
        f"file://{tmp_path}/ds",
        path=str(local),
        seq_len=4096,
        cache_dir=str(tmp_path / "c"),
    )
    assert [s.sha256 for s in m2.splits["train"].shards] == [
        s.sha256 for s in m.splits["train"].shards
    ]
    local.write_bytes(bz2.compress(data[:-1]))
    with pytest.raises(ChecksumMismatchError, match=r"sample\.xml\.bz2: wiki sample is 6,089,745"):
        prepare(
            "wiki-sample", f"file://{tmp_path}/bad", path=str(local), cache_dir=str(tmp_path / "c")
        )
