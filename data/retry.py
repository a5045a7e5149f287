"""Retries with exponential backoff and jitter for transient storage failures.

Object stores fail transiently (connection refused while a server restarts,
timeouts, HTTP 5xx, S3 ``SlowDown``) and permanently (404, access denied,
a checksum mismatch, a corrupt Parquet file). :func:`is_transient` tells the two
apart by walking the exception chain; :func:`retry_call` retries only the
transient ones, bounded in both attempts and total time, and logs every retry.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sparse_transformer.data.errors import DataError, RetriesExhaustedError

log = logging.getLogger("sparse_transformer.data")

T = TypeVar("T")

# S3 error codes (and HTTP statuses) that mean "try again later".
TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "500",
        "502",
        "503",
        "504",
    }
)
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EAGAIN,
        errno.EBUSY,  # s3fs maps SlowDown / ServiceUnavailable / 503 to EBUSY
        getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs maps InternalError / 500 to EREMOTEIO
    }
)
# Exception class names (from botocore, aiohttp, urllib3, fsspec) that are transient.
TRANSIENT_CLASS_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "HTTPClientError",
        "ProxyConnectionError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientPayloadError",
        "FSTimeoutError",
        "IncompleteRead",
        "RemoteDisconnected",
        "ProtocolError",
        "TransientShardError",
    }
)
PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    DataError,
)


class TransientError(Exception):
    """Raised by our own code for a failure worth retrying (e.g. a short read)."""


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    code = getattr(exc, "code", None)  # urllib.error.HTTPError
    if isinstance(code, int):
        return code
    status = getattr(exc, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    return None


def _s3_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code is not None:
            return str(code)
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 16:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: connection errors, timeouts, HTTP 5xx/429, SlowDown.

    Permanent errors (not found, access denied, checksum mismatch, corrupt data)
    return False, and so does anything unrecognised: retrying an unknown error
    only delays the report of a bug.
    """
    chain = _chain(exc)
    # The outermost exception decides first when it is one of ours.
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, PERMANENT_TYPES):
        return False
    for e in chain:
        if isinstance(e, TransientError):
            return True
        code = _s3_code(e)
        if code is not None:
            return code in TRANSIENT_S3_CODES
        status = _http_status(e)
        if status is not None:
            return status >= 500 or status in (408, 429)
        if type(e).__name__ in TRANSIENT_CLASS_NAMES:
            return True
        if isinstance(e, (ConnectionError, TimeoutError, socket.timeout)):
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        reason = getattr(e, "reason", None)  # urllib.error.URLError wraps the socket error
        if isinstance(reason, BaseException) and reason is not e and is_transient(reason):
            return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry: bounded by ``max_attempts`` and by ``deadline_s`` seconds in all.

    The delay before retry n (1-based) is ``min(max_delay_s, base_delay_s * 2**(n-1))``
    with "equal jitter": half of it fixed, the other half uniformly random, so
    that many readers failing together do not retry in lockstep.
    """

    max_attempts: int = 10
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    deadline_s: float = 180.0

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """The sleep before retry number ``retry`` (1-based)."""
        cap = min(self.max_delay_s, self.base_delay_s * (2 ** (retry - 1)))
        r = (rng or random).random()
        return cap / 2 + r * cap / 2


def retry_call(
    fn: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy | None = None,
    classify: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn()``; retry transient failures with backoff, re-raise permanent ones.

    ``what`` names the object being read or written and appears in every log
    line and in the final error. Raises :class:`RetriesExhaustedError` (chained
    to the last failure) when the attempts or the deadline run out.
    """
    policy = policy or RetryPolicy()
    start = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            if not classify(exc):
                raise
            elapsed = time.monotonic() - start
            if attempt >= policy.max_attempts:
                raise RetriesExhaustedError(
                    f"{what}: giving up after {attempt} attempts in {elapsed:.1f} s; "
                    f"last error: {type(exc).__name__}: {exc}"
                ) from exc
            delay = policy.delay(attempt)
            if elapsed + delay > policy.deadline_s:
                raise RetriesExhaustedError(
                    f"{what}: giving up after {attempt} attempts, retry deadline "
                    f"{policy.deadline_s:.0f} s reached; last error: {type(exc).__name__}: {exc}"
                ) from exc
            log.warning(
                "%s: transient failure (attempt %d/%d): %s: %s; retrying in %.2f s",
                what,
                attempt,
                policy.max_attempts,
                type(exc).__name__,
                exc,
                delay,
            )
            sleep(delay)
