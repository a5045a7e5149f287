"""Downloads with checksum verification, retries and a per-user cache.

``download()`` fetches an http(s) URL into the cache (``$SPARSE_TRANSFORMER_CACHE``
or ``~/.cache/sparse-transformer``), streaming to a temporary name, verifying the
expected md5/sha256 and renaming into place only when it matches, so a cached
file is always complete. The requests go through urllib3 (and the proxy the
environment names, as urllib would), which retries them as a
:class:`~sparse_transformer.data.retry.RetryPolicy` says. ``fetch_wiki_sample()`` gets
the Wikipedia XML sample that ships inside the gensim 4.4.0 wheel on PyPI, through
``pip download``.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import urllib3
from urllib3.exceptions import MaxRetryError, ProtocolError, ReadTimeoutError
from urllib3.util.retry import Retry

from sparse_transformer.data.errors import (
    ChecksumMismatchError,
    DownloadError,
    RetriesExhaustedError,
)
from sparse_transformer.data.retry import RetryPolicy
from sparse_transformer.data.storage import replacing

log = logging.getLogger("sparse_transformer.data")

CACHE_ENV = "SPARSE_TRANSFORMER_CACHE"

# The Wikipedia XML sample inside the gensim 4.4.0 wheel (same bytes in every wheel).
WIKI_SAMPLE_PACKAGE = "gensim==4.4.0"
WIKI_SAMPLE_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
# sha256 of the .bz2 as shipped (informational: the decompressed bytes are what is verified).
WIKI_SAMPLE_BZ2_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
WIKI_SAMPLE_SIZE = 6_089_746
WIKI_SAMPLE_SHA256 = "34c1c63050c87cc8477b9ae36b1cb0edf372612c92938b742e579a7109c20fa4"
WIKI_SAMPLE_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.xml"


def default_cache_dir() -> Path:
    """``$SPARSE_TRANSFORMER_CACHE``, else ``$XDG_CACHE_HOME/sparse-transformer``, else ~/.cache."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparse-transformer"


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_file(
    path: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
) -> None:
    """Raise :class:`ChecksumMismatchError` naming ``path`` unless it has the given digests/size."""
    if size is not None and os.path.getsize(path) != size:
        raise ChecksumMismatchError(
            f"{path}: {os.path.getsize(path):,} bytes, expected {size:,} (truncated or wrong file)"
        )
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected:
            got = file_digest(path, algorithm)
            if got != expected.lower():
                raise ChecksumMismatchError(
                    f"{path}: {algorithm} {got} does not match the expected {expected}"
                )


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    md5: str | None = None,
    size: int | None = None,
    timeout_s: float = 60.0,
    policy: RetryPolicy | None = None,
) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is there already.

    Connection errors, timeouts, HTTP 408/429/5xx and a body cut short are retried as
    ``policy`` says (default :class:`RetryPolicy`), then raise
    :class:`RetriesExhaustedError`; other HTTP 4xx raise :class:`DownloadError` at once;
    a digest mismatch raises :class:`ChecksumMismatchError` and leaves nothing at ``dest``.
    """
    dest = Path(dest)
    if dest.exists():
        try:
            verify_file(dest, sha256=sha256, md5=md5, size=size)
            return dest
        except ChecksumMismatchError:
            log.warning("%s: cached copy does not verify; downloading again", dest)
            dest.unlink()

    policy = policy or RetryPolicy()
    log.info("downloading %s -> %s", url, dest)
    with replacing(dest, fsync=False) as tmp:
        try:
            _get(url, tmp, policy.http_retry(f"download {url}"), timeout_s)
        except MaxRetryError as e:
            raise RetriesExhaustedError(
                f"download {url}: giving up after {policy.max_attempts} attempts; "
                f"last error: {e.reason}"
            ) from e
        try:
            verify_file(tmp, sha256=sha256, md5=md5, size=size)
        except ChecksumMismatchError as e:
            raise ChecksumMismatchError(f"download {url}: {e}") from None
    if not (sha256 or md5):
        log.warning(
            "%s: no published checksum to verify against; its sha256 is %s", url, file_digest(dest)
        )
    return dest


def _pool(url: str) -> urllib3.PoolManager:
    """A connection pool for ``url``: through the proxy the environment names for its
    scheme (``https_proxy``, ``no_proxy``, ...), as urllib does, else direct."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.netloc):
        return urllib3.ProxyManager(proxy)
    return urllib3.PoolManager()


def _get(url: str, path: Path, retries: Retry, timeout_s: float) -> None:
    """GET ``url`` into ``path``; ``MaxRetryError`` once ``retries`` are spent.

    urllib3 retries what fails before it hands the response over: connection errors,
    timeouts, HTTP 408/429/5xx. A body cut short fails later, while it is streamed to
    ``path``, where urllib3 can no longer retry it: this loop is the one retry urllib3
    cannot do. It starts the GET again, counted against the same ``Retry`` (``increment``
    then ``sleep``, as urllib3 does between its own attempts).
    """
    http = _pool(url)
    headers = {"User-Agent": "sparse-transformer"}
    while True:
        response = http.request(
            "GET",
            url,
            headers=headers,
            retries=retries,
            timeout=timeout_s,
            preload_content=False,
            decode_content=False,
        )
        try:
            if response.status >= 400:
                raise DownloadError(f"{url}: HTTP {response.status} {response.reason}")
            with open(path, "wb") as f:
                # urllib3 raises ProtocolError when fewer bytes come than Content-Length says.
                for block in response.stream(1 << 20, decode_content=False):
                    f.write(block)
            return
        except (ProtocolError, ReadTimeoutError) as e:
            retries = (response.retries or retries).increment("GET", url, error=e)
        finally:
            response.release_conn()
        retries.sleep()


def extract_wiki_sample(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Write the verified, decompressed wiki sample from a gensim wheel or the bare .bz2 file."""
    archive = Path(archive)
    dest = Path(dest)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                try:
                    compressed = z.read(WIKI_SAMPLE_MEMBER)
                except KeyError:
                    raise DownloadError(f"{archive}: has no member {WIKI_SAMPLE_MEMBER}") from None
        else:
            compressed = archive.read_bytes()
        # The decompressed bytes are what is verified: a re-compressed copy is fine.
        data = bz2.decompress(compressed) if compressed[:3] == b"BZh" else compressed
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise DownloadError(f"{archive}: cannot read the wiki sample: {e}") from e
    got = hashlib.sha256(data).hexdigest()
    if len(data) != WIKI_SAMPLE_SIZE or got != WIKI_SAMPLE_SHA256:
        raise ChecksumMismatchError(
            f"{archive}: wiki sample is {len(data):,} bytes with sha256 {got}; expected "
            f"{WIKI_SAMPLE_SIZE:,} bytes with sha256 {WIKI_SAMPLE_SHA256}"
        )
    with replacing(dest, fsync=False) as tmp:
        tmp.write_bytes(data)
    return dest


def fetch_wiki_sample(cache_dir: str | os.PathLike[str] | None = None, timeout_s: int = 60) -> Path:
    """The path of the decompressed wiki sample (6,089,746 bytes), downloading it on first use.

    The sample is the Wikipedia XML test file of the gensim 4.4.0 wheel on PyPI,
    fetched with ``pip download --no-deps`` (so pip's index configuration and
    proxies apply) and verified against a sha256 recorded here.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dest = cache / "wiki-sample" / WIKI_SAMPLE_FILE
    if dest.exists():
        try:
            verify_file(dest, sha256=WIKI_SAMPLE_SHA256, size=WIKI_SAMPLE_SIZE)
            return dest
        except ChecksumMismatchError:
            dest.unlink()
    with tempfile.TemporaryDirectory(prefix="wiki-sample-") as tmp:
        base = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        base += ["--timeout", str(timeout_s), "--retries", "2", "--dest", tmp]
        attempts = [
            base + [WIKI_SAMPLE_PACKAGE],
            # No wheel for this interpreter: any wheel carries the same data file.
            base
            + ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
            + ["--platform", "manylinux_2_28_x86_64", WIKI_SAMPLE_PACKAGE],
        ]
        errors = []
        for cmd in attempts:
            log.info("fetching the wiki sample: %s", " ".join(cmd[2:]))
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("gensim-*.whl"))
            if proc.returncode == 0 and wheels:
                return extract_wiki_sample(wheels[0], dest)
            errors.append(proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])
        raise DownloadError(f"pip download {WIKI_SAMPLE_PACKAGE} failed: {errors}")
